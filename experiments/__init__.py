"""Configs as code. Each module defines ``get_config()`` returning a :class:`jaxmem.RunConfig`;
its docstring gives the run command, the expected cost and what it reproduces."""
