import io
import math

import pytest
import torch
import torch.nn.functional as F

from msvq.methods import METHODS, MoCoV2, build_method
from msvq.methods.common import FeatureQueue, ema_update_
from msvq.methods.losses import distill_ce, infonce_loss, msvq_loss
from msvq.models import resnet18

BATCH = 8
PROJ_DIM = 8
EXPECTED_VIEW_KINDS = {
    "msvq": ("strong", "weak", "weak", "weak"),
    "msv": ("strong", "weak", "weak"),
    "mq": ("strong", "weak", "weak"),
    "ressl": ("strong", "weak"),
    "mocov2": ("strong", "strong"),
}


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _build(name, *, seed=0, bn_splits=2, shuffle_bn=True, queue_size=32, m1=0.9, m2=0.7, dtype=torch.float32):
    torch.manual_seed(seed)
    method = build_method(
        name,
        lambda: resnet18(width=4, bn_splits=bn_splits),
        proj_hidden=16,
        proj_dim=PROJ_DIM,
        m1=m1,
        m2=m2,
        tau_s=0.1,
        tau_t=0.04,
        queue_size=queue_size,
        shuffle_bn=shuffle_bn,
    )
    return method.to(dtype).train()


def _views(method, seed=1, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, 3, 8, 8, generator=generator, dtype=dtype) for _ in method.view_kinds]


def _perturb_(module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator, dtype=param.dtype))


# Hand computations with Python floats, one row at a time.


def _dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def _log_softmax(logits):
    top = max(logits)
    log_sum = top + math.log(sum(math.exp(value - top) for value in logits))
    return [value - log_sum for value in logits]


def _hand_distill_ce(z_teacher, z_student, queue, tau_t, tau_s):
    total = 0.0
    for teacher_row, student_row in zip(z_teacher.tolist(), z_student.tolist()):
        p = [math.exp(v) for v in _log_softmax([_dot(teacher_row, key) / tau_t for key in queue.tolist()])]
        log_q = _log_softmax([_dot(student_row, key) / tau_s for key in queue.tolist()])
        total -= sum(p_k * log_q_k for p_k, log_q_k in zip(p, log_q))
    return total / z_teacher.shape[0]


def _hand_infonce(q, k, queue, tau):
    total = 0.0
    for query, key in zip(q.tolist(), k.tolist()):
        logits = [_dot(query, key) / tau] + [_dot(query, negative) / tau for negative in queue.tolist()]
        total -= _log_softmax(logits)[0]
    return total / q.shape[0]


def _unit_rows(*shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


# Pure losses.


def test_msvq_loss_matches_hand_computation():
    z1, z2, z3, z4 = (_unit_rows(3, 4, seed=s) for s in range(4))
    queue1, queue2 = _unit_rows(5, 4, seed=10), _unit_rows(6, 4, seed=11)

    loss = msvq_loss(z1, z2, z3, z4, queue1, queue2, tau_s=0.1, tau_t=0.04)

    expected = (
        _hand_distill_ce(z2, z1, queue1, 0.04, 0.1)
        + _hand_distill_ce(z3, z1, queue1, 0.04, 0.1)
        + _hand_distill_ce(z4, z1, queue2, 0.04, 0.1)
    ) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_distill_ce_teacher_gets_no_gradient():
    z_teacher = _unit_rows(3, 4, seed=0).requires_grad_()
    z_student = _unit_rows(3, 4, seed=1).requires_grad_()
    queue = _unit_rows(5, 4, seed=2)

    distill_ce(z_teacher, z_student, queue, tau_t=0.04, tau_s=0.1).backward()

    assert z_teacher.grad is None
    assert z_student.grad.abs().sum() > 0


def test_infonce_matches_hand_computation():
    q, k, queue = _unit_rows(3, 4, seed=0), _unit_rows(3, 4, seed=1), _unit_rows(5, 4, seed=2)

    loss = infonce_loss(q, k, queue, tau=0.2)

    assert loss.item() == pytest.approx(_hand_infonce(q, k, queue, 0.2), abs=1e-6)


def test_losses_stay_float32_under_autocast():
    z1, z2 = _unit_rows(16, 32, seed=0).float(), _unit_rows(16, 32, seed=1).float()
    queue = _unit_rows(64, 32, seed=2).float()

    expected_distill = distill_ce(z2, z1, queue, tau_t=0.04, tau_s=0.1)
    expected_infonce = infonce_loss(z1, z2, queue, tau=0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        distill = distill_ce(z2, z1, queue, tau_t=0.04, tau_s=0.1)
        infonce = infonce_loss(z1, z2, queue, tau=0.2)

    assert distill.dtype == torch.float32
    assert distill.item() == pytest.approx(expected_distill.item(), rel=1e-6)
    assert infonce.item() == pytest.approx(expected_infonce.item(), rel=1e-6)


# Building blocks.


def test_ema_update_moves_parameters_only():
    torch.manual_seed(0)
    student = resnet18(width=4)
    teacher = resnet18(width=4)
    with torch.no_grad():
        for buffer in teacher.buffers():
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 1.5)
    teacher_params = [p.detach().clone() for p in teacher.parameters()]
    teacher_buffers = [b.clone() for b in teacher.buffers()]

    ema_update_(teacher, student, momentum=0.9)

    for after, before, source in zip(teacher.parameters(), teacher_params, student.parameters()):
        torch.testing.assert_close(after, 0.9 * before + 0.1 * source, atol=1e-6, rtol=1e-6)
    for after, before in zip(teacher.buffers(), teacher_buffers):
        assert torch.equal(after, before)


def test_queue_pointer_wraps():
    queue = FeatureQueue(size=10, dim=3)
    batches = [torch.full((4, 3), float(i)) for i in range(1, 4)]

    for keys in batches:
        queue.enqueue_(keys)

    assert queue.ptr.item() == 2
    assert torch.equal(queue.features[4:8], batches[1])
    assert torch.equal(queue.features[8:10], batches[2][:2])
    assert torch.equal(queue.features[0:2], batches[2][2:])
    assert torch.equal(queue.features[2:4], batches[0][2:])


def test_queue_rejects_batch_larger_than_queue():
    queue = FeatureQueue(size=4, dim=3)
    with pytest.raises(ValueError, match="5 keys into a queue of 4 rows"):
        queue.enqueue_(torch.zeros(5, 3))


def test_queue_starts_with_unit_rows_in_state_dict():
    queue = FeatureQueue(size=16, dim=5)

    torch.testing.assert_close(queue.features.norm(dim=1), torch.ones(16))
    assert set(queue.state_dict()) == {"features", "ptr"}


# Training steps.


@pytest.mark.parametrize("name", sorted(METHODS))
def test_registry_entry_runs_one_step(name):
    method = _build(name)

    loss = method.training_step(_views(method), torch.Generator().manual_seed(2))
    loss.backward()

    assert method.view_kinds == EXPECTED_VIEW_KINDS[name]
    assert loss.ndim == 0
    assert torch.isfinite(loss)
    assert loss.item() > 0
    assert method.student_backbone.feature_dim == 32


def test_step_under_bfloat16_autocast():
    method = _build("msvq")
    views = _views(method)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = method.training_step(views, torch.Generator().manual_seed(2))
    loss.backward()

    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert method.queue1.features.dtype == torch.float32
    torch.testing.assert_close(method.queue1.features[:BATCH].norm(dim=1), torch.ones(BATCH), atol=1e-2, rtol=0)


def _loss_after_queue_fill(name: str, bf16: bool) -> float:
    """Fill the queues with 8 steps of features, then return one step's loss, in bf16 or fp32."""
    torch.manual_seed(0)
    method = build_method(
        name, lambda: resnet18(width=16, bn_splits=4), proj_hidden=128, proj_dim=32,
        m1=0.99, m2=0.95, tau_s=0.1, tau_t=0.04, queue_size=256,
    ).train()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(8):
            method.training_step([torch.randn(32, 3, 32, 32, generator=generator) for _ in method.view_kinds],
                                 torch.Generator().manual_seed(3))
    views = [torch.randn(32, 3, 32, 32, generator=generator) for _ in method.view_kinds]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return method.training_step(views, torch.Generator().manual_seed(2)).item()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bf16_loss_matches_fp32(name):
    """bf16 autocast keeps a step's loss within 2% of fp32 on the same weights and views.

    The queues hold real features first: against the random unit vectors a queue starts
    with, the teacher's softmax at temperature 0.04 turns bf16 rounding of the features
    into loss differences of over 10% on a width-4 network.
    """
    fp32 = _loss_after_queue_fill(name, bf16=False)
    bf16 = _loss_after_queue_fill(name, bf16=True)
    assert bf16 == pytest.approx(fp32, rel=2e-2)


def test_msvq_step_uses_pre_batch_queues():
    method = _build("msvq", shuffle_bn=False, dtype=torch.float64)
    _perturb_(method.teacher2, seed=3)
    queue1_before = method.queue1.features.clone()
    queue2_before = method.queue2.features.clone()
    x1, x2, x3, x4 = _views(method, dtype=torch.float64)

    loss = method.training_step([x1, x2, x3, x4])

    # Train-mode BatchNorm uses batch statistics, so a second forward reproduces the step's features.
    with torch.no_grad():
        z1 = method.student(x1)
        z2, z3 = method.teacher1(x2), method.teacher1(x3)
        z4 = method.teacher2(x4)
    expected = msvq_loss(z1, z2, z3, z4, queue1_before, queue2_before, tau_s=0.1, tau_t=0.04)
    after_enqueue = msvq_loss(
        z1, z2, z3, z4, method.queue1.features, method.queue2.features, tau_s=0.1, tau_t=0.04
    )
    assert loss.item() == pytest.approx(expected.item(), abs=1e-10)
    assert abs(loss.item() - after_enqueue.item()) > 1e-3


def test_msvq_step_enqueue_targets():
    method = _build("msvq", shuffle_bn=False, dtype=torch.float64)
    _perturb_(method.teacher2, seed=4)
    x1, x2, x3, x4 = _views(method, dtype=torch.float64)

    method.training_step([x1, x2, x3, x4])

    with torch.no_grad():
        teacher1_x2, teacher1_x3 = method.teacher1(x2), method.teacher1(x3)
        teacher2_x4, teacher1_x4 = method.teacher2(x4), method.teacher1(x4)
    torch.testing.assert_close(method.queue1.features[:BATCH], teacher1_x2, atol=1e-10, rtol=0)
    torch.testing.assert_close(method.queue2.features[:BATCH], teacher2_x4, atol=1e-10, rtol=0)
    assert not torch.allclose(method.queue1.features[:BATCH], teacher1_x3)
    assert not torch.allclose(method.queue2.features[:BATCH], teacher1_x4)
    assert method.queue1.ptr.item() == BATCH
    assert method.queue2.ptr.item() == BATCH


def test_shuffled_teacher_forward_is_unshuffled():
    # With plain BatchNorm the teacher's output per sample does not depend on the order.
    method = _build("ressl", bn_splits=1, shuffle_bn=True, dtype=torch.float64)
    x1, x2 = _views(method, dtype=torch.float64)

    method.training_step([x1, x2], torch.Generator().manual_seed(5))

    with torch.no_grad():
        expected = method.teacher1(x2)
    torch.testing.assert_close(method.queue1.features[:BATCH], expected, atol=1e-10, rtol=0)


def test_shuffle_follows_generator():
    losses = []
    for seed in (6, 6, 7):
        method = _build("msvq", bn_splits=2, shuffle_bn=True)
        losses.append(method.training_step(_views(method), torch.Generator().manual_seed(seed)).item())

    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


def test_step_pointer_wraps_around_queue():
    method = _build("mq", queue_size=12)

    for seed in range(3):
        method.training_step(_views(method, seed=seed))

    assert method.queue1.ptr.item() == (3 * BATCH) % 12
    assert method.queue2.ptr.item() == (3 * BATCH) % 12


def test_step_updates_teachers_by_ema_first():
    method = _build("msvq", m1=0.9, m2=0.7)
    _perturb_(method.teacher1, seed=8)
    _perturb_(method.teacher2, seed=9)
    teacher1_before = [p.clone() for p in method.teacher1.parameters()]
    teacher2_before = [p.clone() for p in method.teacher2.parameters()]

    method.training_step(_views(method))

    student = list(method.student.parameters())
    for after, before, source in zip(method.teacher1.parameters(), teacher1_before, student):
        torch.testing.assert_close(after, 0.9 * before + 0.1 * source, atol=1e-6, rtol=1e-6)
    for after, before, source in zip(method.teacher2.parameters(), teacher2_before, student):
        torch.testing.assert_close(after, 0.7 * before + 0.3 * source, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["msvq", "mocov2"])
def test_gradients_reach_only_student(name):
    method = _build(name)

    method.training_step(_views(method)).backward()

    student_params = list(method.student.parameters())
    assert {id(p) for p in method.trainable_parameters()} == {id(p) for p in student_params}
    assert all(p.grad is not None for p in student_params)
    assert sum(p.grad.abs().sum().item() for p in student_params) > 0
    teacher_params = [p for n, p in method.named_parameters() if not n.startswith("student.")]
    assert teacher_params
    assert all(p.grad is None and not p.requires_grad for p in teacher_params)


def test_teachers_start_as_student_copies():
    method = _build("msvq")

    for teacher in (method.teacher1, method.teacher2):
        for teacher_param, student_param in zip(teacher.parameters(), method.student.parameters()):
            assert torch.equal(teacher_param, student_param)
            assert teacher_param.data_ptr() != student_param.data_ptr()


def test_mocov2_step_matches_hand_computation():
    method = _build("mocov2", shuffle_bn=False, dtype=torch.float64)
    queue_before = method.queue.features.clone()
    x1, x2 = _views(method, dtype=torch.float64)

    loss = method.training_step([x1, x2])

    with torch.no_grad():
        q1, q2 = method.student(x1), method.student(x2)
        k1, k2 = method.key_encoder(x1), method.key_encoder(x2)
    expected = (_hand_infonce(q1, k2, queue_before, 0.1) + _hand_infonce(q2, k1, queue_before, 0.1)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    torch.testing.assert_close(method.queue.features[: 2 * BATCH], torch.cat([k1, k2]), atol=1e-10, rtol=0)
    assert method.queue.ptr.item() == 2 * BATCH


def test_build_method_maps_mocov2_arguments():
    method = _build("mocov2", m1=0.99, queue_size=48)

    assert isinstance(method, MoCoV2)
    assert method.momentum == 0.99
    assert method.temperature == 0.1
    assert method.queue.size == 48


def test_state_dict_restores_queues():
    original = _build("msvq", seed=0)
    for seed in range(2):
        original.training_step(_views(original, seed=seed), torch.Generator().manual_seed(seed))
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)

    restored = _build("msvq", seed=1)
    restored.load_state_dict(torch.load(buffer, weights_only=True))

    state = restored.state_dict()
    for key in ("queue1.features", "queue1.ptr", "queue2.features", "queue2.ptr"):
        assert torch.equal(state[key], original.state_dict()[key]), key
    assert state["queue1.ptr"].item() == 2 * BATCH
    assert any(key.startswith("teacher2.") for key in state)
    next_views = _views(original, seed=9)
    expected = original.training_step(next_views, torch.Generator().manual_seed(3))
    actual = restored.training_step(next_views, torch.Generator().manual_seed(3))
    assert actual.item() == expected.item()


def test_wrong_number_of_views_raises():
    method = _build("msv")
    with pytest.raises(ValueError, match="expects 3 views"):
        method.training_step(_views(method)[:2])


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="unknown method 'byol'"):
        _build("byol")


@pytest.mark.parametrize("shuffle_bn", [True, False])
def test_joint_teacher_pass_matches_separate(shuffle_bn):
    method = _build("msvq", bn_splits=2, shuffle_bn=shuffle_bn)
    _perturb_(method.teacher1, seed=3)
    x2, x3 = _views(method)[1:3]
    separate_generator = torch.Generator().manual_seed(7)
    separate = [method._encode_teacher(method.teacher1, x, separate_generator) for x in (x2, x3)]
    joint = method._encode_teacher_views(method.teacher1, [x2, x3], torch.Generator().manual_seed(7))
    for separate_features, joint_features in zip(separate, joint):
        torch.testing.assert_close(joint_features, separate_features, atol=1e-5, rtol=1e-5)


def test_joint_teacher_pass_restores_split_count():
    method = _build("msv", bn_splits=2)
    method._encode_teacher_views(method.teacher1, _views(method)[1:3], torch.Generator().manual_seed(0))
    splits = {layer.num_splits for layer in method.teacher1.modules() if hasattr(layer, "num_splits")}
    assert splits == {2}


def test_joint_teacher_pass_plain_batchnorm_separate():
    """With bn_splits 1 a joint pass would pool both views' statistics, so views go one by one."""
    method = _build("msvq", bn_splits=1)
    x2, x3 = _views(method)[1:3]
    separate_generator = torch.Generator().manual_seed(7)
    separate = [method._encode_teacher(method.teacher1, x, separate_generator) for x in (x2, x3)]
    joint = method._encode_teacher_views(method.teacher1, [x2, x3], torch.Generator().manual_seed(7))
    for separate_features, joint_features in zip(separate, joint):
        torch.testing.assert_close(joint_features, separate_features, atol=0, rtol=0)


def test_compile_networks_keeps_state_dict_keys():
    method = _build("msvq")
    keys = list(method.state_dict())

    method.compile_networks()

    assert list(method.state_dict()) == keys
    for name in ("student", "teacher1", "teacher2"):
        assert getattr(method, name)._compiled_call_impl is not None, name
    assert method.queue1._compiled_call_impl is None
