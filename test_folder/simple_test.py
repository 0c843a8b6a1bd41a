"""Smoke test: load the engine from the weights root, generate one image, print where it is.

Runnable directly (python test_folder/simple_test.py); needs weights (make weights).
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import weights_root
from engine.generator import Engine
from engine.request import GenerationRequest
from utils import read_parameters, save_image


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    engine = Engine.load(weights_root())
    loaded = time.perf_counter()
    [result] = engine.generate(GenerationRequest(prompt="a red fox in the snow", seed=1, num_inference_steps=8))
    done = time.perf_counter()
    path = save_image(
        result.image, result.parameters.to_a1111(), "png", 100, Path(tempfile.mkdtemp()) / "simple_test.png"
    )
    assert read_parameters(path) == result.parameters.to_a1111()
    print(
        f"setup {loaded - start:.1f}s, generation {done - loaded:.2f}s, {result.image.size[0]}x{result.image.size[1]}"
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
