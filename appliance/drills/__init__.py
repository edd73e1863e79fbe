"""Fault and load drills against the real product (make chaos, make soak; smokes of them in the suite).
No product module imports it."""
