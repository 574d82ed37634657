"""`python -m captioner` runs the CLI."""

from captioner.cli import main

if __name__ == "__main__":
    main()
