"""Small, real training runs used by tests, demos and the documentation's measured figures."""
