"""``python -m pyactadd``: the same CLI as the ``pyactadd`` command."""

from pyactadd.cli import main

main(prog_name="pyactadd")
