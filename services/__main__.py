"""``python -m services order|payment|inventory|shipping|all``."""

from services.cli import main

main()
