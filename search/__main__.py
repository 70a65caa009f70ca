"""``python -m search`` runs the ``genre-search`` command line."""

from search.cli import main

main(prog_name="genre-search")
