"""The `cmdtool` command line (typer). It only calls the library in `cmdtool`; nothing there imports this."""
