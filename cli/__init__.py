"""The ``kvforge`` command line: one module per command (``add_arguments(parser)`` and ``run(args)``),
and the dispatcher beside them (:mod:`.main`). The top floor: it may import every other package."""
