import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*register_constant.*")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny full-precision Llama saved with a character tokenizer (for the CLI tests)."""
    from checkpoint_helpers import char_tokenizer, tied_llama

    d = tmp_path_factory.mktemp("fp") / "tiny-llama"
    tied_llama(seed=1).save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A text file of SAMPLE_TEXT (calibration / evaluation text for the CLI tests)."""
    from checkpoint_helpers import SAMPLE_TEXT

    p = tmp_path_factory.mktemp("text") / "sample.txt"
    p.write_text(SAMPLE_TEXT)
    return p

