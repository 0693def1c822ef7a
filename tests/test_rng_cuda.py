"""The checkpoint's RNG state holds every CUDA device's generator and gives it back (CUDA
mocked, so this runs on CPU; tests/test_gpu.py resumes dropout on a real GPU)."""
import torch

from toolkit.callbacks import RNGState


class FakeCuda:
    """torch.cuda's RNG surface for ``n`` devices, the process drawing on ``current``."""

    def __init__(self, n: int, current: int):
        self.states = [torch.full((16,), 10 * d, dtype=torch.uint8) for d in range(n)]
        self.n, self.current = n, current

    def install(self, monkeypatch):
        c = torch.cuda
        monkeypatch.setattr(c, "is_available", lambda: True)
        monkeypatch.setattr(c, "device_count", lambda: self.n)
        monkeypatch.setattr(c, "current_device", lambda: self.current)
        monkeypatch.setattr(c, "get_rng_state_all", lambda: [s.clone() for s in self.states])
        monkeypatch.setattr(c, "set_rng_state_all", self.set_all)
        monkeypatch.setattr(c, "set_rng_state", self.set_one)

    def set_all(self, states):
        for d, s in enumerate(states):
            self.states[d] = s.clone()

    def set_one(self, state, device):
        self.states[device] = state.clone()


def _roundtrip(saver: FakeCuda, loader: FakeCuda, monkeypatch):
    saver.install(monkeypatch)
    saved = RNGState().state_dict()
    assert [torch.equal(a, b) for a, b in zip(saved["rng"]["cuda"], saver.states)] == [True] * saver.n
    assert saved["rng"]["cuda_device"] == saver.current
    # plain tensors and ints: loads with weights_only=True
    buf = __import__("io").BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    loader.install(monkeypatch)
    cb = RNGState()
    cb.load_state_dict(loaded)
    cb.on_train_start(None, None)
    return saved["rng"]["cuda"]


def test_single_process_restores_every_device(monkeypatch):
    saver, loader = FakeCuda(2, 0), FakeCuda(2, 0)
    saver.states = [torch.arange(16, dtype=torch.uint8) + d for d in range(2)]
    saved = _roundtrip(saver, loader, monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(loader.states, saved))


def test_ddp_rank_gets_rank0_device_state_on_its_own_device(monkeypatch):
    # rank 0 drew on cuda:0 (state A); rank 1 resumes on cuda:1 and must continue from A
    saver = FakeCuda(2, 0)
    saver.states = [torch.full((16,), 7, dtype=torch.uint8), torch.full((16,), 99, dtype=torch.uint8)]
    loader = FakeCuda(2, 1)
    _roundtrip(saver, loader, monkeypatch)
    assert torch.equal(loader.states[1], torch.full((16,), 7, dtype=torch.uint8))


def test_more_saved_devices_than_visible_warns_and_restores_the_rest(monkeypatch, recwarn):
    saver, loader = FakeCuda(4, 0), FakeCuda(2, 0)
    saver.states = [torch.full((16,), d + 1, dtype=torch.uint8) for d in range(4)]
    _roundtrip(saver, loader, monkeypatch)
    assert [int(s[0]) for s in loader.states] == [1, 2]
    assert any("4 CUDA devices" in str(w.message) for w in recwarn)


def test_cpu_checkpoint_leaves_cuda_generators_alone(monkeypatch):
    cb = RNGState()
    state = cb.state_dict()  # real torch.cuda: this machine has none
    assert "cuda" not in state["rng"] or torch.cuda.is_available()
    loader = FakeCuda(1, 0)
    before = loader.states[0].clone()
    loader.install(monkeypatch)
    cb.load_state_dict({"rng": {k: v for k, v in state["rng"].items() if not k.startswith("cuda")}})
    cb.on_train_start(None, None)
    assert torch.equal(loader.states[0], before)
