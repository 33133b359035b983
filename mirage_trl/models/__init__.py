"""Models: what a saved folder is (`resolve`), processors (`processors`), the one loader for training and
inference (`load`), and the tiny offline models of the tests and the demo (`tiny`)."""
