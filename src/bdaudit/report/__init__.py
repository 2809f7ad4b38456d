"""The report object and its renderers (terminal, JSON, SARIF, HTML)."""
