"""The benchmark's console output: tables that fit 100 columns without breaking a word, a
footer that defines every column, and help text with defaults for every CLI option."""

import io
import re

import pytest
import torch
from rich.console import Console

from nattn.__main__ import build_parser
from nattn.cli import bench

BOX = "│┃━┏┓┗┛┡┩╇┳┻┼├┤─└┘┬┴╋╹╻"


def _row(impl, fwd, status="ok", reason="", notes=(), setup=None, auto=False, bwd=None):
    r = {"impl": impl, "status": status, "reason": reason, "notes": list(notes),
         "setup_s": setup, "auto": auto}
    for key, t in (("fwd", fwd), ("fwd_bwd", bwd)):
        if t is not None:
            r.update({f"{key}_s": t, f"{key}_rate": 1.234e11 / t, f"{key}_frac_matmul": 0.0123,
                      f"{key}_frac_bound": 0.456, f"{key}_nattn_speedup": 12.3456})
    if bwd is None:
        r["fwd_bwd_reason"] = "FlexAttention has no backward on CPU (torch raises " \
                              "NotImplementedError)"
    return r


def _results():
    long_reason = ("SDPA with a dense mask materializes B*H*N*(N+M) scores: 12.5 GiB > 2 GiB "
                   "limit, which is far more than this machine should spend on a baseline")
    rows = [_row("nattn:cpu", 0.01123, auto=True, bwd=0.031),
            _row("nattn:reference", None, status="skipped", reason=long_reason),
            _row("sdpa-dense-mask", 0.1858, notes=["SDPA kernel: flash_attention"], setup=0.66,
                 bwd=0.6),
            _row("flex-attention", 0.2137, notes=["first call (compile) 95.3 s"], setup=0.73)]
    return [{"name": name, "scale": scale, "rows": rows}
            for name, scale in (("dinat-t-stage3", 0.5), ("hunyuan-video-720p", 0.125),
                                ("cpu-1d-16k", 1))]


def _words(text):
    return set(re.split(r"[\s" + BOX + "]+", text)) - {""}


@pytest.mark.parametrize("backward", [False, True])
def test_tables_fit_100_columns_without_broken_words(backward):
    buf = io.StringIO()
    out = Console(file=buf, width=100, color_system=None)
    scaling = [{"small": "cpu-2d-64", "large": "cpu-2d-128", "token_ratio": 4, "small_s": 0.005,
                "large_s": 0.02, "time_ratio": 4.0}]
    bench.print_tables(out, _results(), [], torch.device("cpu"), backward, False, scaling,
                       ["nattn:hopper", "nattn:cuda"], 2)
    text = buf.getvalue()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100
    # every word of the output is a whole word of what was printed: nothing was folded
    source = " ".join(bench._footer(torch.device("cpu"), backward, scaling,
                                    ["nattn:hopper", "nattn:cuda"]))
    for res in _results():
        for r in res["rows"]:
            source += f" {res['name']} x{res['scale']:g} {r['impl']} {r['impl']}* "
            source += " " + bench._row_note(r, ("fwd",)) + " " + bench._row_note(r, ("fwd_bwd",))
    allowed = _words(source) | {"problem", "impl", "ms", "GFLOP/s", "%mm", "%bound", "speedup",
                                "note", "named", "problems:", "forward", "only", "+",
                                "backward", "(2", "threads)", "-"}
    for word in _words(text):
        if re.fullmatch(r"\[\d+\]|[\d.]+x?", word):
            continue  # footnote marks and numbers
        assert word in allowed, f"{word!r} is not a whole word of the output's text"
    # forward-only or forward + backward is in every title; every skipped row's reason is given
    assert "forward only" in text
    assert ("forward + backward (2 threads)" in text) == backward
    assert "materializes B*H*N*(N+M) scores" in text
    assert "not shown: nattn:hopper, nattn:cuda" in text
    # one number format per column: every ms cell of the forward table has two decimals
    assert "11.23" in text and "185.80" in text


def test_footer_defines_every_column_and_tag():
    footer = " ".join(bench._footer(torch.device("cpu"), False, [], []))
    for term in ("xF", "*", "ms / us", "GFLOP/s", "%mm", "%bound", "speedup", "note",
                 "forward only", "FLOP bound", "memory bound", "kernel bound"):
        assert term in footer
    scaling = [{"small": "a", "large": "b", "token_ratio": 4, "small_s": 1e-3, "large_s": 4e-3,
                "time_ratio": 4.0}]
    text = " ".join(bench._footer(torch.device("cpu"), True, scaling, []))
    assert "interleaved" in text and "differ from the table's medians" in text
    note = bench._row_note(_results()[0]["rows"][2], ("fwd",))
    assert "setup 660.00 ms (untimed)" in note


def _actions(parser, path=()):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield from _actions(sub, path + (name,))
        elif action.option_strings and action.dest != "help":
            yield path, action


def test_every_option_has_help_and_its_default():
    for path, action in _actions(build_parser()):
        where = f"{' '.join(path)} {'/'.join(action.option_strings)}"
        assert action.help, f"{where} has no help text"
        flag = action.nargs == 0  # store_true: off unless given
        assert flag or "default" in action.help.lower(), \
            f"{where}: help does not state the default"
