"""`python -m treegrpo` (and `accelerate launch -m treegrpo`) runs the CLI."""

from treegrpo.app import main

if __name__ == "__main__":
    main()
