"""Fuzz the safetensors header and index parsers for some minutes (not part of CI).

    python fuzz/fuzz_format.py --minutes 5            # hypothesis, random and structured inputs
    python fuzz/fuzz_format.py --atheris --minutes 5  # coverage-guided, if atheris installs

Every input must either parse or raise CheckpointFormatError; anything else is a bug, and so is
an allocation driven by a claimed size (never trusted): the peak memory is checked at the end.
"""

from __future__ import annotations

import argparse
import json
import resource
import struct
import sys
import time

from dcp_hf.errors import CheckpointFormatError
from dcp_hf.format import decode_index, read_header

LIMIT_MIB = 1024  # peak RSS allowed (imports included); inputs are at most a few KB


def check_one(data: bytes) -> None:
    """Parse ``data`` as a whole file and as an index; only our error may come out."""
    for blob in (data, struct.pack("<Q", max(0, len(data) - 8)) + data[8:]):
        try:
            read_header(lambda off, n: blob[off : off + n], "fuzz.safetensors", len(blob))
        except CheckpointFormatError:
            pass
    try:
        decode_index(data, "fuzz.index.json")
    except CheckpointFormatError:
        pass


def structured(draw_json) -> bytes:
    body = json.dumps(draw_json).encode()
    return struct.pack("<Q", len(body)) + body + bytes(64)


def run_hypothesis(minutes: float) -> int:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    leaf = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8)
    entry = st.fixed_dictionaries(
        {
            "dtype": st.sampled_from(["F32", "BF16", "U8", "I64", "BOOL", "F8_E4M3", "X"]) | leaf,
            "shape": st.lists(st.integers(-3, 2**63), max_size=4) | leaf,
            "data_offsets": st.lists(st.integers(-3, 2**64), max_size=3) | leaf,
        }
    )
    headers = st.dictionaries(st.text(max_size=6), entry | leaf, max_size=5)
    deadline = time.monotonic() + minutes * 60
    count = 0

    @settings(max_examples=10**9, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=512) | headers.map(structured))
    def fuzz(data):
        nonlocal count
        count += 1
        check_one(data)
        if time.monotonic() > deadline:
            raise _Done

    try:
        fuzz()
    except _Done:
        pass
    return count


class _Done(Exception):
    pass


def run_atheris(minutes: float) -> None:
    """Coverage-guided: libFuzzer stops after ``minutes`` and exits the process."""
    import inspect

    import atheris

    import dcp_hf.format.header as header_mod
    import dcp_hf.format.index as index_mod

    for module in (header_mod, index_mod):  # coverage feedback for the parsers only
        for name, obj in list(vars(module).items()):
            if inspect.isfunction(obj) and obj.__module__ == module.__name__:
                setattr(module, name, atheris.instrument_func(obj))
    globals()["read_header"] = header_mod.read_header
    globals()["decode_index"] = index_mod.decode_index
    atheris.Setup(
        sys.argv[:1] + [f"-max_total_time={max(1, int(minutes * 60))}", f"-rss_limit_mb={LIMIT_MIB * 2}"], check_one
    )
    atheris.Fuzz()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--atheris", action="store_true")
    args = parser.parse_args()
    if args.atheris:
        run_atheris(args.minutes)
    else:
        n = run_hypothesis(args.minutes)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"fuzz: {n} inputs in {args.minutes} min, only CheckpointFormatError raised, peak RSS {peak:.0f} MiB")
        if peak > LIMIT_MIB:
            raise SystemExit(f"fuzz: peak RSS {peak:.0f} MiB exceeds {LIMIT_MIB} MiB")


if __name__ == "__main__":
    main()
