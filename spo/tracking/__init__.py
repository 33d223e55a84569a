"""What stages log through: the Tracker protocol (tracker.py) and its MLflow implementation."""
