import pathlib

import numpy as np
import pytest

GOLDENS = pathlib.Path(__file__).resolve().parent.parent / "goldens"


@pytest.fixture
def goldens() -> pathlib.Path:
    return GOLDENS


def load_npy(case: str, name: str) -> np.ndarray:
    return np.load(GOLDENS / case / f"{name}.npy")
