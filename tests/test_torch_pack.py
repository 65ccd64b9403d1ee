"""diffq_c.torch_pack against diffq.torch_pack: identical bytes for every
storage dtype, TorchScript use, and quantized states packed with it."""
import pytest
import torch

import diffq  # the oracle: these tests must fail, not skip, without it
import diffq.torch_pack as diffq_torch_pack
import diffq_c
from diffq_c import torch_pack

# torch 2.13 deprecates TorchScript; scripting it is the point here
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")

STORAGE = [torch.int16, torch.uint8, torch.int32, torch.int64]


@pytest.mark.parametrize("storage", STORAGE)
def test_identical_to_diffq(storage):
    gen = torch.Generator().manual_seed(0)
    for length in [0, 1, 7, 16, 17, 64, 1000, 4099]:
        for nbits in [0, 1, 3, 8, 15]:
            top = 2 ** (nbits or 6)
            values = torch.randint(0, top, (length,), generator=gen, dtype=torch.int16)
            theirs = diffq_torch_pack.pack(values, nbits, storage)
            ours = torch_pack.pack(values, nbits, storage)
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
            assert ours.numpy().tobytes() == theirs.numpy().tobytes()
            assert torch.equal(torch_pack.unpack(ours, length), values)
            assert torch.equal(torch_pack.unpack(theirs), diffq_torch_pack.unpack(theirs))


def test_sign_bit_words_round_trip():
    # all ones: the top bit of each int16 / int32 / int64 word is set
    values = torch.full((300,), 2 ** 15 - 1, dtype=torch.int16)
    for storage in STORAGE:
        packed = torch_pack.pack(values, 15, storage)
        assert torch.equal(packed, diffq_torch_pack.pack(values, 15, storage))
        assert torch.equal(torch_pack.unpack(packed, 300), values)


def test_other_integer_inputs_and_shapes():
    values = torch.randint(0, 200, (6, 7, 5), dtype=torch.int64)
    for dtype in (torch.uint8, torch.int32, torch.int64):
        x = values.to(dtype)
        assert torch.equal(torch_pack.pack(x), diffq_torch_pack.pack(x))
    assert torch.equal(torch_pack.unpack(torch_pack.pack(values), values.numel()),
                       values.view(-1).short())


def test_scripted_pack_and_unpack():
    scripted_unpack = torch.jit.script(torch_pack.unpack)
    scripted_pack = torch.jit.script(torch_pack.pack)
    values = torch.randint(0, 1000, (5000,), dtype=torch.int16)
    for storage in STORAGE:
        packed = scripted_pack(values, 10, storage)
        assert torch.equal(packed, diffq_torch_pack.pack(values, 10, storage))
        assert torch.equal(scripted_unpack(packed, 5000), values)
    assert torch.equal(scripted_pack(values, 0, torch.int16), torch_pack.pack(values))


def test_errors():
    with pytest.raises(TypeError):
        torch_pack.pack(torch.rand(10))
    with pytest.raises(ValueError):
        torch_pack.pack(torch.tensor([-1, 2]))
    with pytest.raises(ValueError):
        torch_pack.pack(torch.tensor([9]), nbits=3)
    with pytest.raises(ValueError):
        torch_pack.pack(torch.tensor([1]), storage_dtype=torch.float32)
    with pytest.raises(ValueError):
        torch_pack.unpack(torch.zeros(2, 3, dtype=torch.int16), 100)


def conv_net(seed=1):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv1d(8, 32, 5), torch.nn.ReLU(),
                               torch.nn.Conv1d(32, 16, 3))


QUANTIZERS = {
    "diffq": lambda lib, m: lib.DiffQuantizer(m, min_size=0, group_size=8),
    "lsq": lambda lib, m: lib.LSQ(m, min_size=0, bits=5),
}


@pytest.mark.parametrize("kind", sorted(QUANTIZERS))
def test_torch_pack_states_identical_and_restore(kind):
    theirs, ours = conv_net(), conv_net()
    s_theirs = QUANTIZERS[kind](diffq, theirs).get_quantized_state(torch_pack=True)
    s_ours = QUANTIZERS[kind](diffq_c, ours).get_quantized_state(torch_pack=True)
    assert s_ours["meta"]["torch_pack"] and s_theirs["meta"]["torch_pack"]

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                yield from tensors(item)

    for a, b in zip(tensors(s_ours["quantized"]), tensors(s_theirs["quantized"])):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    x = torch.randn(2, 8, 20)
    theirs.eval()
    expected = theirs(x)
    for state in (s_ours, s_theirs):
        fresh = conv_net(seed=9)
        diffq_c.restore_quantized_state(fresh, state)
        assert torch.equal(fresh.eval()(x), expected)
    fresh = conv_net(seed=9)
    diffq.restore_quantized_state(fresh, s_ours)
    assert torch.equal(fresh.eval()(x), expected)


def test_uniform_torch_pack_state_restores():
    # diffq passes the float bits to its torch_pack and fails
    with pytest.raises(TypeError):
        diffq.UniformQuantizer(conv_net(), bits=6, min_size=0).get_quantized_state(torch_pack=True)
    model = conv_net()
    quantizer = diffq_c.UniformQuantizer(model, bits=6, min_size=0)
    state = quantizer.get_quantized_state(torch_pack=True)
    levels = quantizer.get_quantized_state(packed=False)["quantized"][0][0]
    assert torch.equal(state["quantized"][0][0], diffq_torch_pack.pack(levels, 6))
    fresh = conv_net(seed=2)
    diffq_c.restore_quantized_state(fresh, state)
    x = torch.randn(2, 8, 20)
    assert torch.equal(fresh.eval()(x), model.eval()(x))
