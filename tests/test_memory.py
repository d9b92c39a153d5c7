"""Liveness walk on hand-made graphs with hand-computed answers; TFLite arena and RSS measurements."""

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from rd_keras.bench import liveness as memory  # noqa: E402

L = keras.layers


def _conv(x, channels, name, strides=1):
    return L.Conv2D(channels, 3, strides=strides, padding="same", name=name)(x)


def _chain():
    # Input (8,8,3) -> Conv(4) -> ReLU -> Conv(2). float32, batch 1:
    # input 8*8*3*4 = 768 B, conv1 and relu 8*8*4*4 = 1024 B each, conv2 8*8*2*4 = 512 B.
    x = keras.Input((8, 8, 3), name="x")
    y = _conv(x, 4, "c1")
    y = L.ReLU(name="r1")(y)
    return keras.Model(x, _conv(y, 2, "c2"))


def _block(x, name, mid, shortcut=True):
    """conv -> bn -> relu -> conv -> bn [-> add(x)] -> relu; `mid` channels inside."""
    y = _conv(x, mid, f"{name}_conv1")
    y = L.BatchNormalization(name=f"{name}_bn1")(y)
    y = L.ReLU(name=f"{name}_relu1")(y)
    y = _conv(y, x.shape[-1], f"{name}_conv2")
    y = L.BatchNormalization(name=f"{name}_bn2")(y)
    if shortcut:
        y = L.Add(name=f"{name}_add")([x, y])
    return L.ReLU(name=f"{name}_relu2")(y)


def _blocks(specs, shortcut=True):
    # Input (8,8,4) float32: 256 B per channel, so a 4-channel map is 1024 B and 16 channels 4096 B.
    x = keras.Input((8, 8, 4), name="x")
    y = x
    for name, mid in specs:
        y = _block(y, name, mid, shortcut)
    return keras.Model(x, {"logits": y})


def test_chain_fused_and_unfused():
    unfused = memory.feature_map_liveness(_chain(), fuse=False)
    # x: 768. c1 runs: x + c1 = 1792, then x dies. r1: c1 + r1 = 2048, c1 dies. c2: r1 + c2 = 1536.
    assert unfused["steps"] == [("x", 768), ("c1", 1792), ("r1", 2048), ("c2", 1536)]
    assert unfused["peak_bytes"] == 2048 and unfused["peak_step"] == "r1"
    assert unfused["total_activation_bytes"] == 768 + 1024 + 1024 + 512
    # A chain only ever holds one layer's input and output: the peak is the two-buffer bound.
    assert unfused["two_buffer_lower_bound"] == 2048

    fused = memory.feature_map_liveness(_chain())
    # The ReLU writes in place into the conv's buffer: x + c1 = 1792, then c1 + c2 = 1536.
    assert fused["steps"] == [("x", 768), ("c1+r1", 1792), ("c2", 1536)]
    assert fused["peak_bytes"] == fused["two_buffer_lower_bound"] == 1792
    assert fused["total_activation_bytes"] == 768 + 1024 + 512

    # Batch 2 of int8 scales every buffer by 2/4.
    int8 = memory.feature_map_liveness(_chain(), batch_size=2, dtype_bytes=1)
    assert int8["peak_bytes"] == 896

    # A Sequential runs the same graph.
    seq = keras.Sequential(
        [keras.Input((8, 8, 3)), L.Conv2D(4, 3, padding="same"), L.ReLU(), L.Conv2D(2, 3, padding="same")]
    )
    assert [live for _, live in memory.feature_map_liveness(seq)["steps"]] == [768, 1792, 1536]


def test_single_residual_block():
    model = _blocks([("b1", 4)])
    fused = memory.feature_map_liveness(model)
    # All maps 1024 B. x stays live until the add. conv1(+bn1+relu1): x + h1 = 2048.
    # conv2(+bn2): x + h1 + h2 = 3072 (input + two others), h1 dies. add(+relu2): x + h2 + out = 3072.
    assert fused["steps"] == [
        ("x", 1024),
        ("b1_conv1+b1_bn1+b1_relu1", 2048),
        ("b1_conv2+b1_bn2", 3072),
        ("b1_add+b1_relu2", 3072),
    ]
    assert fused["peak_bytes"] == 3072 and fused["peak_step"] == "b1_conv2+b1_bn2"
    assert fused["peak_index"] == 2
    # The add reads two maps and writes a third.
    assert fused["two_buffer_lower_bound"] == 3072
    assert fused["total_activation_bytes"] == 4 * 1024

    unfused = memory.feature_map_liveness(model, fuse=False)
    # Every layer owns a buffer; with x held, each of bn1, relu1, conv2, bn2 and add peaks at
    # 3 * 1024 (x, its input, its output); bn1 is the first. Eight buffers in all.
    assert [live for _, live in unfused["steps"]] == [1024, 2048, 3072, 3072, 3072, 3072, 3072, 2048]
    assert unfused["peak_step"] == "b1_bn1"
    assert unfused["total_activation_bytes"] == 8 * 1024


def test_two_blocks_and_plain_twin():
    # Block 1 keeps 4 channels; block 2 widens to 16 inside (4096 B) and comes back to 4.
    resnet = memory.feature_map_liveness(_blocks([("b1", 4), ("b2", 16)]))
    # Block 1 as in the single block: 2048, 3072, 3072; then only its output r1 (1024) is live.
    # b2 conv1: r1 + h (4096) = 5120. b2 conv2: r1 + h + h2 (1024) = 6144, h dies.
    # b2 add: r1 + h2 + out = 3072.
    assert [live for _, live in resnet["steps"]] == [1024, 2048, 3072, 3072, 5120, 6144, 3072]
    assert resnet["peak_bytes"] == 6144 and resnet["peak_step"] == "b2_conv2+b2_bn2"
    # Widest in + out: b2 conv1 (1024 + 4096) or conv2 (4096 + 1024); the shortcut adds r1 on top.
    assert resnet["two_buffer_lower_bound"] == 5120
    assert resnet["total_activation_bytes"] == 1024 + 3 * 1024 + 4096 + 2 * 1024

    plain_model = _blocks([("b1", 4), ("b2", 16)], shortcut=False)
    plain = memory.feature_map_liveness(plain_model)
    # No add: relu2 fuses into conv2. x+h 2048, h+out 2048, out+h 5120, h+out 5120.
    assert plain["steps"] == [
        ("x", 1024),
        ("b1_conv1+b1_bn1+b1_relu1", 2048),
        ("b1_conv2+b1_bn2+b1_relu2", 2048),
        ("b2_conv1+b2_bn1+b2_relu1", 5120),
        ("b2_conv2+b2_bn2+b2_relu2", 5120),
    ]
    assert plain["peak_bytes"] == plain["two_buffer_lower_bound"] == 5120

    share = memory.shortcut_share(_blocks([("b1", 4), ("b2", 16)]), plain_model)
    assert share["resnet_peak"] == 6144 and share["plain_peak"] == 5120
    assert share["ratio"] == pytest.approx(1.2)
    assert share["shortcut_share"] == pytest.approx(1 / 6)


def test_dict_outputs_default_to_logits():
    # Three 4-channel convs (+ReLU) of 1024 B; the first is also exposed as 'stage1'.
    x = keras.Input((8, 8, 4), name="x")
    s1 = L.ReLU(name="stage1")(_conv(x, 4, "a"))
    s2 = L.ReLU(name="stage2")(_conv(s1, 4, "b"))
    model = keras.Model(x, {"stage1": s1, "logits": _conv(s2, 4, "c")})
    # Logits only: a chain, 2048 at every step.
    assert memory.feature_map_liveness(model)["peak_bytes"] == 2048
    # Holding stage1 to the end adds it to c's step: stage1 + stage2 + c = 3072.
    held = memory.feature_map_liveness(model, outputs="all")
    assert held["peak_bytes"] == 3072 and held["peak_step"] == "c"
    stage1_only = memory.feature_map_liveness(model, outputs=["stage1"])
    assert stage1_only["steps"] == [("x", 1024), ("a+stage1", 2048)]


def test_argument_validation():
    model = _chain()
    with pytest.raises(ValueError, match="got 0"):
        memory.feature_map_liveness(model, batch_size=0)
    with pytest.raises(ValueError, match="'half'"):
        memory.feature_map_liveness(model, dtype_bytes="half")
    with pytest.raises(ValueError, match="'logits'"):
        memory.feature_map_liveness(model, outputs=["logits"])
    with pytest.raises(TypeError, match="int"):
        memory.tflite_arena_bytes(3)
    with pytest.raises(ValueError, match="'often'"):
        memory.peak_rss_delta(lambda: None, method="often")


@pytest.fixture(scope="module")
def chain_tflite(tmp_path_factory):
    tf = pytest.importorskip("tensorflow")
    keras.utils.set_random_seed(0)
    model = _chain()
    content = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    path = tmp_path_factory.mktemp("tflite") / "chain.tflite"
    path.write_bytes(content)
    return content, path


def test_tflite_arena(chain_tflite):
    content, path = chain_tflite
    arena = memory.tflite_arena_bytes(content)
    assert arena == memory.tflite_arena_bytes(str(path))
    # Every conv needs its input and output at once (fused chain bound 1792), and the planner reuses
    # memory, so the arena is below the sum of every map plus the im2col scratch of both convs
    # (8*8*27*4 and 8*8*36*4 bytes).
    assert 1792 <= arena < 768 + 1024 + 512 + 8 * 8 * (27 + 36) * 4
    assert memory.tflite_arena_bytes(content, batch_size=4) > arena


@pytest.mark.parametrize("method", ["auto", "sample"])
def test_peak_rss_delta_sees_a_known_allocation(method):
    nbytes = 200 * 2**20
    delta = memory.peak_rss_delta(lambda: np.ones(nbytes // 8), method=method)
    assert abs(delta - nbytes) < 0.1 * nbytes
    # Nothing allocated: close to zero.
    assert memory.peak_rss_delta(lambda: None, method=method) < 0.05 * nbytes
