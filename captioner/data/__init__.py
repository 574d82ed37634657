"""Data: image loading, vocabulary, the built-in synthetic world, dataset readers and batching."""
