"""The staging ring (dcp_hf.storage.staging), forced onto CPU tensors: the same pipeline as for
CUDA tensors, with the copies on a worker thread. The oracle is plain torch: ``src.to(dtype)``
for saves, ``dest.copy_(src)`` for loads."""

from __future__ import annotations

import concurrent.futures as cf
import os
import pickle
import random
import threading
import time

import pytest
import torch

from dcp_hf.storage.staging import FORCE_ENV, Slab, Stager, box_view, cut, pump

TIMEOUT = 60  # seconds: a hang fails the test instead of stalling the suite


def within_timeout(fn, *args):
    """Run ``fn`` in a thread; fail (not hang) if it does not finish in TIMEOUT seconds."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn(*args)
        except BaseException as e:  # re-raised in the test's thread
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(TIMEOUT)
    assert not thread.is_alive(), f"{fn.__name__} did not finish in {TIMEOUT} s (deadlock?)"
    if "error" in result:
        raise result["error"]
    return result.get("value")


class SlowCopies(Stager):
    """Copies that take a moment on the worker thread, so a piece handed out before its copy
    completed, or a slot reused too early, shows in the bytes."""

    def _copy(self, dst, src, after):
        if self._worker is None:
            self._worker = cf.ThreadPoolExecutor(1, thread_name_prefix="test-stage")

        def slow():
            time.sleep(0.002)
            dst.copy_(src)

        return self._worker.submit(slow)

    def quiesce(self) -> None:
        """Wait for every copy issued so far (the worker runs them in order)."""
        if self._worker is not None:
            self._worker.submit(lambda: None).result()


def sources(seed: int = 0) -> list[Slab]:
    """Sources of every kind: contiguous, non-contiguous (transposed, strided), cast on the
    way out, rows larger than a slot, a scalar, an empty tensor."""
    g = torch.Generator().manual_seed(seed)
    f32 = torch.randn(37, 29, generator=g)
    slabs = [
        Slab(f32, torch.bfloat16, "f32->bf16"),
        Slab(f32.t(), torch.float32, "transposed"),
        Slab(torch.randn(6, 5, 40, generator=g)[:, ::2, 3:], torch.float16, "strided->f16"),
        Slab(torch.randint(-1000, 1000, (300,), generator=g, dtype=torch.int32), torch.int32, "long 1-d"),
        Slab(torch.randn(3, 200, generator=g).to(torch.bfloat16), torch.bfloat16, "rows > slot"),
        Slab(torch.tensor(3.25), torch.float32, "scalar"),
        Slab(torch.empty(0, 7), torch.float32, "empty"),
        Slab(torch.randn(40, 8, generator=g, dtype=torch.float64), torch.float32, "f64->f32"),
    ]
    return [slab._replace(tag=f"{slab.tag} {seed}") for slab in slabs]


def expected_bytes(slab: Slab, offsets=None, sizes=None) -> bytes:
    t = slab.tensor.to(slab.dtype).contiguous()
    if offsets is not None:
        t = box_view(t, offsets, sizes).contiguous()
    return t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


# -- cutting ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape,itemsize,max_bytes",
    [((10, 4), 4, 48), ((10, 4), 4, 1000), ((3, 5, 7), 2, 10), ((3, 5, 7), 2, 30), ((100,), 8, 64), ((), 4, 16)],
)
def test_cut_covers_the_tensor_in_order_in_pieces_that_fit(shape, itemsize, max_bytes):
    whole = torch.arange(max(1, torch.Size(shape).numel())).view(shape)
    boxes = list(cut(shape, itemsize, max_bytes))
    flat = torch.cat([box_view(whole, o, s).reshape(-1) for o, s in boxes])
    assert torch.equal(flat, whole.reshape(-1))  # in C order, each element once
    assert all(torch.Size(s).numel() * itemsize <= max_bytes for _, s in boxes)


def test_cut_takes_whole_rows_and_cuts_a_row_only_when_it_does_not_fit():
    assert list(cut((10, 4), 4, 48)) == [((0, 0), (3, 4)), ((3, 0), (3, 4)), ((6, 0), (3, 4)), ((9, 0), (1, 4))]
    assert list(cut((2, 10), 4, 16))[:3] == [((0, 0), (1, 4)), ((0, 4), (1, 4)), ((0, 8), (1, 2))]
    assert list(cut((0, 9), 4, 16)) == [((0, 0), (0, 9))]
    with pytest.raises(ValueError, match="cannot hold one element"):
        list(cut((4,), 8, 4))


# -- saves ------------------------------------------------------------------------------------
def check_save(stager: Stager, slabs: list[Slab], window: int) -> None:
    """A slow consumer that holds up to ``window`` pieces at once and checks each one's bytes
    when it releases it: a slot reused before its release shows as wrong bytes."""
    out = {slab.tag: bytearray() for slab in slabs}
    held = []
    by_tag = {slab.tag: slab for slab in slabs}

    def release_oldest():
        piece = held.pop(0)
        if isinstance(stager, SlowCopies):
            stager.quiesce()  # a copy issued into this piece's slot would have landed by now
        assert bytes(piece.data) == expected_bytes(by_tag[piece.tag], piece.offsets, piece.sizes), piece.tag
        out[piece.tag] += bytes(piece.data)
        piece.release()

    with stager.save(slabs) as run:
        for piece in run:
            assert piece.nbytes <= stager.slot_bytes
            held.append(piece)
            if len(held) == window:
                release_oldest()
        while held:
            release_oldest()
    for slab in slabs:
        assert bytes(out[slab.tag]) == expected_bytes(slab), slab.tag


@pytest.mark.parametrize("slots", [1, 2, 3, 4])
def test_save_through_a_small_ring_with_a_slow_consumer_is_bit_exact(slots):
    stager = SlowCopies(slots=slots, slot_bytes=256, force=True)
    # The consumer holds every slot but the one the stager needs to go on.
    within_timeout(check_save, stager, sources(0) + sources(1) + sources(2), max(1, slots - 1))
    within_timeout(check_save, stager, sources(3), 1)  # the ring is reused by the next run
    assert stager._buffers.count(None) == 0 and not any(stager._held) and not stager._active


@pytest.mark.parametrize("copies", ["slow", "3 threads"])
def test_save_pieces_on_a_thread_pool_are_bit_exact(copies):
    if copies == "slow":
        stager = SlowCopies(slots=3, slot_bytes=200, force=True)
    else:  # copies complete out of order
        stager = Stager(slots=3, slot_bytes=200, force=True, cpu_threads=3)
    slabs = sources(2) + sources(3) + sources(4)
    by_tag = {s.tag: s for s in slabs}
    rng = random.Random(0)
    seen = []

    def write(piece):
        time.sleep(rng.random() * 0.003)  # writes finish out of order
        assert bytes(piece.data) == expected_bytes(by_tag[piece.tag], piece.offsets, piece.sizes), piece.tag
        seen.append((piece.tag, piece.offsets))
        return piece.nbytes

    def save():
        with cf.ThreadPoolExecutor(4) as pool:
            return sum(pump(stager.save(slabs), write, pool, limit=5))

    total = within_timeout(save)
    assert total == sum(len(expected_bytes(s)) for s in slabs)
    assert len(seen) == sum(len(list(cut(tuple(s.tensor.shape), s.dtype.itemsize, 200))) for s in slabs)


def test_without_force_contiguous_cpu_tensors_are_not_copied():
    src = torch.randn(64, 16)
    stager = Stager(slots=2, slot_bytes=1024, force=False)
    pieces = []
    for piece in stager.save([Slab(src, torch.float32), Slab(src, torch.bfloat16)]):  # no `with run`: the
        with piece:  # next run ends this one
            pieces.append((piece.host.data_ptr(), piece.offsets, bytes(piece.data)))
    direct = [p for p in pieces if src.data_ptr() <= p[0] < src.data_ptr() + src.nbytes]
    assert len(direct) == 4  # the fp32 pieces are views of the source; the bf16 ones went through slots
    assert b"".join(p[2] for p in pieces) == expected_bytes(Slab(src, torch.float32)) + expected_bytes(
        Slab(src, torch.bfloat16)
    )


def test_force_from_the_environment(monkeypatch):
    monkeypatch.setenv("DCP_HF_FORCE_STAGING", "1")
    assert Stager().force
    monkeypatch.setenv("DCP_HF_FORCE_STAGING", "0")
    assert not Stager().force


# -- loads ------------------------------------------------------------------------------------
def destinations(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(bytes as stored, destination) pairs: the destination non-contiguous, of another dtype,
    or plain."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(37, 29, generator=g).to(torch.bfloat16), torch.zeros(37, 29)),  # bf16 file -> fp32
        (torch.randn(29, 37, generator=g), torch.zeros(37, 29).t()),  # into a transposed view
        (
            torch.randn(5, 3, 60, generator=g).to(torch.float16),
            torch.zeros(5, 6, 80, dtype=torch.float16)[:, ::2, 7:67],
        ),
        (torch.randint(0, 1 << 30, (300,), generator=g), torch.zeros(300, dtype=torch.int64)),
        (torch.tensor(1.5), torch.zeros(())),
        (torch.empty(0, 3), torch.zeros(0, 3)),
    ]


def fill(piece, stored: torch.Tensor) -> int:
    piece.data[:] = box_view(stored, piece.offsets, piece.sizes).contiguous().view(-1).view(torch.uint8).numpy()
    return piece.nbytes


@pytest.mark.parametrize("force,threads", [(True, 1), (False, 1), (True, 3)])
def test_load_into_non_contiguous_and_cast_destinations_is_bit_exact(force, threads):
    pairs = destinations(3) * 2
    oracle = [dest.clone().copy_(stored) for stored, dest in pairs]  # plain torch copies
    slabs = [Slab(dest, stored.dtype, stored) for stored, dest in pairs]
    stager = (SlowCopies if threads == 1 else Stager)(slots=2, slot_bytes=128, force=force, cpu_threads=threads)

    def load():
        with cf.ThreadPoolExecutor(3) as pool:
            return sum(pump(stager.load(slabs), lambda p: fill(p, p.tag), pool, limit=4))

    within_timeout(load)  # when the run ends, every copy into a destination has completed
    for (stored, dest), want in zip(pairs, oracle):
        assert torch.equal(dest, want)
    assert not any(stager._held)


def test_load_with_a_single_thread_consumer():
    stored = torch.randn(50, 10)
    dest = torch.zeros(10, 50).t()
    stager = SlowCopies(slots=2, slot_bytes=96, force=True)

    def load():
        with stager.load([Slab(dest, torch.float32, None)]) as run:
            for piece in run:
                with piece:
                    fill(piece, stored)

    within_timeout(load)
    assert torch.equal(dest, stored)


# -- errors -----------------------------------------------------------------------------------
def test_an_error_in_the_consumer_releases_every_slot():
    stager = SlowCopies(slots=2, slot_bytes=64, force=True)
    slabs = sources(4)

    def fail_midway():
        for i, piece in enumerate(stager.save(slabs)):
            with piece:
                if i == 5:
                    raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        within_timeout(fail_midway)
    within_timeout(check_save, stager, slabs, 1)  # the abandoned run is ended; no slot leaked


def test_an_error_on_the_thread_pool_stops_the_run_and_leaves_that_destination_alone():
    stored = torch.arange(64, dtype=torch.float32).view(16, 4)
    dest = torch.full((16, 4), -1.0)
    stager = SlowCopies(slots=2, slot_bytes=32, force=True)

    def work(piece):
        if piece.offsets[0] == 4:
            raise OSError("short read")
        return fill(piece, stored)

    def load():
        with cf.ThreadPoolExecutor(2) as pool:
            list(pump(stager.load([Slab(dest, torch.float32)]), work, pool, limit=2))

    with pytest.raises(OSError, match="short read"):
        within_timeout(load)
    assert torch.equal(dest[4:6], torch.full((2, 4), -1.0))  # the failed piece was never copied
    assert not any(stager._held) and not stager._active
    within_timeout(check_save, stager, sources(5), 1)


def test_an_error_in_a_copy_is_raised_by_the_run_and_the_ring_recovers():
    class FailingCopy(Stager):
        def _copy(self, dst, src, after):
            if src.dtype == torch.float64:
                raise RuntimeError("copy failed")
            return super()._copy(dst, src, after)

    stager = FailingCopy(slots=2, slot_bytes=64, force=True)
    with pytest.raises(RuntimeError, match="copy failed"):
        within_timeout(check_save, stager, sources(6), 1)
    within_timeout(check_save, stager, sources(6)[:-1], 1)


def test_a_load_piece_of_an_ended_run_writes_nothing():
    dest = torch.full((4, 4), -1.0)
    stager = Stager(slots=2, slot_bytes=64, force=True)
    old = next(iter(stager.load([Slab(dest, torch.float32)])))
    old.host.fill_(7.0)
    within_timeout(check_save, stager, sources(9), 1)  # a new run ends the abandoned one
    old.finish()
    old.finish()
    assert torch.equal(dest, torch.full((4, 4), -1.0))


def test_a_stager_pickles_without_its_buffers_and_works_after():
    stager = Stager(slots=2, slot_bytes=64, force=True)
    within_timeout(check_save, stager, sources(7), 1)
    copy = pickle.loads(pickle.dumps(stager))
    assert copy._buffers == [None, None]
    within_timeout(check_save, copy, sources(7), 1)
    stager.close()
    within_timeout(check_save, stager, sources(8), 1)  # usable again after close


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_save_and_load_through_pinned_slots():
    stager = Stager(slots=3, slot_bytes=4096)
    src = torch.randn(300, 70, device="cuda")
    slabs = [Slab(src, torch.bfloat16, "bf16"), Slab(src.t(), torch.float32, "t")]
    check_save(stager, slabs, 2)
    assert all(stager._pinned)
    stored = torch.randn(70, 300).to(torch.bfloat16)
    dest = torch.zeros(300, 70, device="cuda").t()
    with stager.load([Slab(dest, torch.bfloat16)]) as run:
        for piece in run:
            with piece:
                fill(piece, stored)
    assert torch.equal(dest.cpu(), stored.float())


def _save_and_load_staged(rank, world, root):
    """With staging forced on CPU tensors: save fp32 row and column shards exported as bf16,
    load them back into fp32 destinations (a cast) and into non-contiguous ones; return what
    this rank holds after each step, for the oracle."""
    os.environ[FORCE_ENV] = "1"
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from dcp_hf import HFLoadPlanner, HFSavePlanner, HFStorageReader, HFStorageWriter

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(3)
    full = {"rows.weight": torch.randn(67, 40, generator=g), "cols.weight": torch.randn(24, 90, generator=g)}
    state = {
        "rows.weight": distribute_tensor(full["rows.weight"], mesh, [Shard(0)], src_data_rank=None),
        "cols.weight": distribute_tensor(full["cols.weight"], mesh, [Shard(1)], src_data_rank=None),
    }
    writer = HFStorageWriter(root, dtype=torch.bfloat16, io_chunk_bytes=1000)  # many small pieces
    dcp.save(state, storage_writer=writer, planner=HFSavePlanner())
    # plain lists: tensors sent back through the result queue share memory with a process that exits
    saved = {k: v.to_local().tolist() for k, v in state.items()}
    for v in state.values():
        v.to_local().zero_()
    reader = HFStorageReader(root, allow_dtype_cast=True, io_chunk_bytes=1000)
    dcp.load(state, storage_reader=reader, planner=HFLoadPlanner())
    loaded = {k: v.to_local().tolist() for k, v in state.items()}
    offsets = {k: tuple(v.__create_chunk_list__()[0].offsets) for k, v in state.items()}
    return saved, loaded, offsets


@pytest.mark.slow
def test_save_and_load_through_forced_staging_on_two_ranks(tmp_path):
    """The writer's and reader's pipelines with every piece staged (as CUDA tensors are): the
    files hold each rank's chunk cast to bf16 (read with safetensors), and loading casts back."""
    from safetensors.torch import load_file

    from dcp_hf.local_ranks import run_ranks

    root = str(tmp_path / "ckpt")
    results = run_ranks(_save_and_load_staged, 2, root)
    files = load_file(os.path.join(root, "model.safetensors"))
    for saved, loaded, offsets in results:
        for key, values in saved.items():
            local = torch.tensor(values, dtype=torch.float32)
            box = tuple(slice(o, o + n) for o, n in zip(offsets[key], local.shape))
            assert files[key].dtype == torch.bfloat16
            assert torch.equal(files[key][box], local.to(torch.bfloat16)), key
            assert torch.equal(torch.tensor(loaded[key]), local.to(torch.bfloat16).to(torch.float32)), key
