"""``python -m medkt`` (also ``torchrun -m medkt``) = the ``medkt`` command."""
from medkt.cli import main

main()
