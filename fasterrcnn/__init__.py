"""The deployment surface: ``python -m fasterrcnn {export,serve,demo,detect,prepare}``."""
