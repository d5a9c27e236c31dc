"""``python -m services order|payment|inventory|shipping|all``."""

from saga_demo.cli import main

main()
