"""``python -m rvqa`` (and ``accelerate launch -m rvqa ...``)."""

from rvqa.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
