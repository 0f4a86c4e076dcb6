"""``python -m radguard.cli``: the ``radguard`` command."""

from radguard.cli import main

if __name__ == "__main__":  # pragma: no cover
    main()
