"""Helpers shared by the tests."""
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


def config_path(name: str, preset: str | None = None) -> str:
    path = os.path.join(CONFIGS, f"{name}.py")
    return f"{path}:{preset}" if preset else path
