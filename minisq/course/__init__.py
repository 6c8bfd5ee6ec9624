"""The course's grading helpers (used by ``assignments/``)."""
