"""The ``awq-ao`` command line: quantize a model, evaluate, generate, convert, describe.

::

    awq-ao quantize MODEL --out DIR [--bits 4] [--group-size 128] [--calib PATH|HUB_DATASET] ...
    awq-ao eval DIR --text FILE [--windows N] [--seq-len 2048]
    awq-ao generate DIR --prompt TEXT [--max-new-tokens 64] [--chat] [--sample ...]
    awq-ao convert DIR --format {awq_ao,autoawq,compressed-tensors} --out OUT
    awq-ao info DIR [--layers] [--json] [--verify]

Failures exit with status 1 and a one-line ``awq-ao: error: ...`` on stderr (``--debug``
shows the traceback); bad arguments exit with status 2. Progress and log lines go to stderr;
stdout carries the results (reports, perplexity, generated text).

The package: :mod:`~awq_ao.cli.inputs` (argument types, loading models, tokenizers and
calibration text, format pre-checks), :mod:`~awq_ao.cli.commands` (one ``cmd_*`` per
subcommand), :mod:`~awq_ao.cli.entry` (the parser and :func:`main`).
"""

from awq_ao.cli.entry import build_parser, main
from awq_ao.cli.inputs import CLIError, load_calibration_text, load_source_model

__all__ = ["main", "build_parser", "load_source_model", "load_calibration_text", "CLIError"]
