"""Reporters: figures, the html report and summary.json (``cmdtool report``), and exports for other tools
(``cmdtool export``). They read committed results and the analyzer registry; they never fit anything."""
