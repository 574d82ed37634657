"""The visual-concept loss: an image must say which words its captions contain (Fang et al. 2015).

A captioner trained from scratch learns to see only through the decoder's loss, and on a few thousand
photos the decoder learns the language long before the encoder learns the pictures: the captions
collapse to the few sentences that fit every photo. Asking the pooled image memory for the bag of words
of the image's captions gives the encoder a direct signal (CaptionModel.concepts computes the logits).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from captioner.data.vocab import Vocabulary

# Words in more than this share of the training images ("a", "in", "the", ".") say nothing about a
# particular image; leaving them out keeps the target on the words that tell images apart.
MAX_IMAGE_SHARE = 0.25


def concept_words(groups: Sequence[Sequence[str]], vocab: Vocabulary) -> torch.Tensor:
    """(V,) bool: the words the concept loss asks for, from the training images' caption groups."""
    images_with = torch.zeros(len(vocab), dtype=torch.long)
    for captions in groups:
        ids = {i for c in captions for i in vocab.encode(c)}
        images_with[list(ids)] += 1
    allowed = images_with <= MAX_IMAGE_SHARE * max(len(groups), 1)
    allowed[[vocab.pad_id, vocab.bos_id, vocab.eos_id, vocab.unk_id]] = False
    return allowed


def concept_loss_sum(logits: torch.Tensor, targets: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the word logits (B, V) against each image's bag of caption words, summed over images.

    targets (B*K, T) are the image-major caption rows of the batch (padding included: it is not allowed);
    an image's target spreads evenly over the allowed words that any of its K captions contains.
    """
    B, V = logits.shape
    words = targets.reshape(B, -1)  # (B, K*T): every token of the image's captions
    bag = torch.zeros(B, V, device=logits.device).scatter_(1, words, 1.0) * allowed.to(logits.device)
    counts = bag.sum(dim=1, keepdim=True)  # (B, 1)
    target = bag / counts.clamp(min=1.0)  # (B, V), rows of images with no allowed word are all zero
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum()
