"""Model loading and the tiny offline models used by the tests and the demo."""
