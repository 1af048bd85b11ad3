"""The command line: one module per command group (``cli.py`` puts them together),
the options they share (``commands.options``) and the front-end tools they call
(``runner``, ``launcher``, ``chaintools``, ``datafetch``, ``plotting``)."""
