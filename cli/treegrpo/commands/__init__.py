"""The commands besides training: sampling and evaluation (`inference.py`), the reward server
(`reward_server.py`) and environment info (`envinfo.py`)."""
