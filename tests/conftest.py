import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))  # make `oracles` importable
pytest.register_assert_rewrite("oracles")  # its shared checks report like test asserts
