"""ATRank: shapes, padding invariance, per-group lookups, training signal, attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqrank.data.types import Batch, Schema
from seqrank.models.atrank import ATRank

DAY = 86400
PV, BUY, CART, FAV = 1, 2, 3, 4


def make_schema(num_behaviors: int = 5) -> Schema:
    names = ("pv", "buy", "cart", "fav")[: num_behaviors - 1] if num_behaviors > 2 else ("review",)
    return Schema(
        name="t",
        num_users=50,
        num_items=100,
        num_cates=10,
        num_behaviors=num_behaviors,
        behavior_names=names,
        protocol="loo",
    )


def make_batch(
    schema: Schema,
    B: int = 8,
    L: int = 12,
    *,
    seed: int = 0,
    min_len: int = 1,
    behaviors: tuple[int, ...] | None = None,
) -> Batch:
    """A random left-padded batch; histories have min_len..L events."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, L + 1, (B,), generator=g)  # (B,)
    mask = torch.arange(L)[None, :] >= (L - lengths)[:, None]  # (B, L) left padding
    item = torch.randint(1, schema.num_items, (B, L), generator=g)
    if behaviors is None:
        behavior = torch.randint(1, schema.num_behaviors, (B, L), generator=g)
    else:
        choice = torch.randint(0, len(behaviors), (B, L), generator=g)
        behavior = torch.tensor(behaviors)[choice]
    # gaps grow towards the past, from hours to years
    gap = (torch.arange(L - 1, -1, -1)[None, :] * DAY * 7 * torch.rand(B, 1, generator=g)).long()
    target = torch.randint(1, schema.num_items, (B,), generator=g)
    return Batch(
        user=torch.randint(1, schema.num_users, (B,), generator=g),
        hist_item=item * mask,
        hist_cate=(item % 9 + 1) * mask,
        hist_behavior=behavior * mask,
        hist_gap=gap * mask,
        hist_mask=mask,
        target_item=target,
        target_cate=target % 9 + 1,
        label=torch.randint(0, 2, (B,), generator=g).float(),
        index=torch.arange(B),
    )


def small(schema: Schema | None = None, **kw) -> ATRank:
    kw = {"embed_dim": 8, "num_heads": 2, "l2_reg": 0.0, **kw}
    return ATRank(schema or make_schema(), **kw)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MODES = [(g, t) for g in ("item", "behavior") for t in ("concat", "add")]


@pytest.mark.parametrize(("group_by", "time_mode"), MODES)
def test_output_shape(group_by: str, time_mode: str) -> None:
    torch.manual_seed(0)
    model = small(group_by=group_by, time_mode=time_mode, num_layers=2)
    batch = make_batch(make_schema(), B=6, L=9)
    logits, att = model(batch, return_attention=True)
    assert logits.shape == (6,)
    assert len(att["self"]) == 2 and att["self"][0].shape == (6, 2, 9, 9)
    assert att["target"].shape == (6, 9)
    assert model(batch).shape == (6,)


def test_amazon_schema_has_no_action_lookup() -> None:
    torch.manual_seed(0)
    model = small(make_schema(num_behaviors=2))
    assert len(model.behaviors.action) == 0 and model.num_groups == 1
    assert model(make_batch(make_schema(num_behaviors=2))).shape == (8,)


@pytest.mark.parametrize(("group_by", "time_mode"), MODES)
def test_padding_invariance(group_by: str, time_mode: str) -> None:
    torch.manual_seed(0)
    schema = make_schema()
    model = small(schema, group_by=group_by, time_mode=time_mode, num_layers=2).eval()
    batch = make_batch(schema, B=16, L=10, min_len=0)
    pad = ~batch.hist_mask
    g = torch.Generator().manual_seed(1)
    scrambled = batch.replace(
        hist_item=torch.where(pad, torch.randint(1, 100, pad.shape, generator=g), batch.hist_item),
        hist_cate=torch.where(pad, torch.randint(1, 10, pad.shape, generator=g), batch.hist_cate),
        hist_behavior=torch.where(
            pad, torch.randint(1, 5, pad.shape, generator=g), batch.hist_behavior
        ),
        hist_gap=torch.where(pad, torch.randint(0, 10**9, pad.shape, generator=g), batch.hist_gap),
    )
    with torch.no_grad():
        torch.testing.assert_close(model(scrambled), model(batch))


@pytest.mark.parametrize("time_mode", ["concat", "add"])
def test_per_group_lookups_are_distinct_parameters(time_mode: str) -> None:
    torch.manual_seed(0)
    model = small(group_by="behavior", time_mode=time_mode)
    emb = model.behaviors
    assert len(emb.time) == len(emb.action) == len(emb.proj) == 4
    for tables in (emb.time, emb.action, emb.proj):
        weights = [t.weight for t in tables]
        assert len({w.data_ptr() for w in weights}) == len(weights)
        for a in weights:
            for b in weights:
                assert a is b or not torch.equal(a, b)
    names = {n for n, _ in model.named_parameters()}
    assert {f"behaviors.time.{g}.weight" for g in range(4)} <= names


@pytest.mark.parametrize("time_mode", ["concat", "add"])
def test_gradient_reaches_only_own_group(time_mode: str) -> None:
    torch.manual_seed(0)
    model = small(group_by="behavior", time_mode=time_mode)
    batch = make_batch(make_schema(), behaviors=(PV,))
    F.binary_cross_entropy_with_logits(model(batch), batch.label).backward()
    emb = model.behaviors
    assert emb.time[0].weight.grad is not None and emb.time[0].weight.grad.abs().sum() > 0
    for g in (1, 2, 3):
        for table in (emb.time[g], emb.action[g], emb.proj[g]):
            grad = table.weight.grad
            assert grad is None or grad.abs().sum() == 0


def test_item_mode_action_lookup_tells_behaviours_apart() -> None:
    torch.manual_seed(0)
    schema = make_schema()
    batch = make_batch(schema, B=4, L=6)
    relabelled = batch.replace(
        hist_behavior=torch.where(batch.hist_mask, 5 - batch.hist_behavior, 0)
    )
    with_actions = small(schema).eval()
    torch.manual_seed(0)
    without = small(schema, use_actions=False).eval()
    assert len(without.behaviors.action) == 0
    with torch.no_grad():
        assert not torch.allclose(with_actions(batch), with_actions(relabelled))
        torch.testing.assert_close(without(batch), without(relabelled))


def test_overfits_fixed_batch() -> None:
    torch.manual_seed(0)
    schema = make_schema()
    model = small(schema, embed_dim=16)
    batch = make_batch(schema, B=64, L=10, seed=3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(batch), batch.label)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def _train_steps(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    schema = make_schema()
    model = small(schema, dropout=0.1, group_by="behavior", l2_reg=1e-3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(3):
        batch = make_batch(schema, seed=step)
        opt.zero_grad()
        logits = model(batch)
        (
            F.binary_cross_entropy_with_logits(logits, batch.label) + model.regularization()
        ).backward()
        opt.step()
    return model.eval()(make_batch(schema, seed=99)).detach()


def test_seeded_determinism() -> None:
    torch.testing.assert_close(_train_steps(7), _train_steps(7), rtol=0, atol=0)
    assert not torch.equal(_train_steps(7), _train_steps(8))


@pytest.mark.parametrize("group_by", ["item", "behavior"])
def test_empty_histories_are_finite(group_by: str) -> None:
    torch.manual_seed(0)
    schema = make_schema()
    model = small(schema, group_by=group_by, l2_reg=1e-2)
    batch = make_batch(schema, B=6, L=5)
    empty = torch.tensor([True, False, True, False, False, False])
    mask = batch.hist_mask & ~empty[:, None]
    batch = batch.replace(
        hist_mask=mask,
        hist_item=batch.hist_item * mask,
        hist_cate=batch.hist_cate * mask,
        hist_behavior=batch.hist_behavior * mask,
        hist_gap=batch.hist_gap * mask,
    )
    logits, att = model(batch, return_attention=True)
    assert torch.isfinite(logits).all()
    assert torch.equal(model._user[empty], torch.zeros_like(model._user[empty]))
    # an empty history leaves the target bias alone (zero at init)
    torch.testing.assert_close(logits[empty], torch.zeros(2))
    assert torch.equal(att["target"][empty], torch.zeros(2, 5))
    (logits.sum() + model.regularization()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_attention_weights_sum_to_one_over_valid_keys() -> None:
    torch.manual_seed(0)
    model = small(num_layers=2, dropout=0.3).eval()
    batch = make_batch(make_schema(), B=10, L=8, min_len=1)
    _, att = model(batch, return_attention=True)
    mask = batch.hist_mask
    target = att["target"]  # (B, L)
    torch.testing.assert_close(target.sum(-1), torch.ones(10))
    assert torch.equal(target[~mask], torch.zeros_like(target[~mask]))
    for w in att["self"]:  # (B, H, L, L)
        rows = w.sum(-1)  # (B, H, L)
        torch.testing.assert_close(rows, mask[:, None, :].float().expand_as(rows))
        assert (w * ~mask[:, None, None, :]).abs().sum() == 0


def test_keeps_most_recent_max_len_events() -> None:
    torch.manual_seed(0)
    schema = make_schema()
    model = small(schema, max_len=4).eval()
    batch = make_batch(schema, L=10, min_len=6)
    cut = batch.replace(
        **{
            k: getattr(batch, k)[:, -4:]
            for k in ("hist_item", "hist_cate", "hist_behavior", "hist_gap", "hist_mask")
        }
    )
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model(cut))


def test_regularization_matches_definition() -> None:
    torch.manual_seed(0)
    model = small(l2_reg=0.1)
    with pytest.raises(RuntimeError):
        model.regularization()
    model(make_batch(make_schema(), B=5))
    u, v = model._user, model._target
    expected = 0.1 * ((u**2).sum() + (v**2).sum()) / 2 / 5
    torch.testing.assert_close(model.regularization(), expected)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"num_heads": 3}, ["num_heads=3", "16"]),
        ({"time_mode": "sum"}, ["time_mode", "'sum'", "concat", "add"]),
        ({"group_by": "user"}, ["group_by", "'user'", "item", "behavior"]),
        ({"dropout": 1.0}, ["dropout", "1.0"]),
        ({"max_len": 0}, ["max_len", "0"]),
        ({"time_buckets": 0}, ["time_buckets", "0"]),
        ({"num_layers": 0}, ["num_layers", "0"]),
        ({"embed_dim": 1}, ["embed_dim", "1"]),
        ({"l2_reg": -1.0}, ["l2_reg", "-1.0"]),
        ({"time_unit_seconds": 0.0}, ["time_unit_seconds", "0.0"]),
    ],
)
def test_invalid_hyperparameters_fail_at_construction(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        small(**kwargs)
    for word in words:
        assert word in str(err.value)


def make_cart_batch(B: int, L: int, g: torch.Generator) -> tuple[Batch, torch.Tensor]:
    """Label 1 iff the target's category is that of the most recent cart event.

    Every history holds L events: one or two carts, the rest pv distractors of random
    categories; time gaps grow towards the past.
    """
    cate = torch.randint(1, 10, (B, L), generator=g)  # (B, L)
    behavior = torch.full((B, L), PV)
    pos = torch.randint(L // 2, L, (B,), generator=g)  # most recent cart
    behavior[torch.arange(B), pos] = CART
    early = torch.randint(0, L // 2, (B,), generator=g)  # an older cart, half of the time
    two = torch.rand(B, generator=g) < 0.5
    behavior[torch.arange(B)[two], early[two]] = CART
    label = torch.rand(B, generator=g) < 0.5
    cart_cate = cate[torch.arange(B), pos]
    other = (cart_cate - 1 + torch.randint(1, 9, (B,), generator=g)) % 9 + 1  # != cart_cate
    target_cate = torch.where(label, cart_cate, other)
    item = cate + 9 * torch.randint(0, 10, (B, L), generator=g)  # item_cate = item % 9 or 9
    target_item = target_cate + 9 * torch.randint(0, 10, (B,), generator=g)
    gap = (torch.arange(L - 1, -1, -1)[None, :] * DAY * 3).expand(B, L).clone()
    batch = Batch(
        user=torch.ones(B, dtype=torch.long),
        hist_item=item,
        hist_cate=cate,
        hist_behavior=behavior,
        hist_gap=gap,
        hist_mask=torch.ones(B, L, dtype=torch.bool),
        target_item=target_item,
        target_cate=target_cate,
        label=label.float(),
        index=torch.arange(B),
    )
    return batch, behavior == CART


def _train_on_carts(**kw) -> tuple[float, float, float]:
    """Train on the planted-cart task; return accuracy, target attention on carts, cart share."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = small(embed_dim=16, num_heads=2, **kw)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        batch, _ = make_cart_batch(128, 12, g)
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(batch), batch.label).backward()
        opt.step()
    batch, is_cart = make_cart_batch(1024, 12, g)
    with torch.no_grad():
        logits, att = model.eval()(batch, return_attention=True)
    accuracy = ((logits > 0).float() == batch.label).float().mean().item()
    cart_mass = (att["target"] * is_cart).sum(-1).mean().item()
    return accuracy, cart_mass, is_cart.float().mean().item()


def test_target_attention_finds_the_planted_behaviour() -> None:
    accuracy, cart_mass, cart_share = _train_on_carts(use_actions=True)
    assert accuracy > 0.8, accuracy
    assert cart_mass > 2 * cart_share, (cart_mass, cart_share)
    # the action lookup carries the signal: masking action types loses most of it
    blind_accuracy, _, _ = _train_on_carts(use_actions=False)
    assert blind_accuracy < accuracy - 0.1, (blind_accuracy, accuracy)


@pytest.mark.parametrize("group_by", ["item", "behavior"])
def test_sparse_embeddings_train_like_dense_ones(group_by: str) -> None:
    """`sparse_embeddings=True`: the item and category tables get row gradients, and with
    seqrank's Adam (its default, dense-equivalent update) and the reference's clipping at 5
    the weights follow the dense-gradient run (float64, to rounding)."""
    from seqrank.optim import Adam, clip_gradients_

    schema = make_schema()
    nets = {}
    for sparse in (False, True):
        torch.manual_seed(0)
        net = ATRank(
            schema,
            embed_dim=8,
            num_heads=2,
            max_len=12,
            group_by=group_by,
            sparse_embeddings=sparse,
        ).double()
        opt = Adam(net.parameters(), lr=1e-2)
        for seed in range(3):
            b = make_batch(schema, seed=seed)
            loss = (
                F.binary_cross_entropy_with_logits(net(b).float(), b.label) + net.regularization()
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients_(list(net.parameters()), 5.0)
            opt.step()
        nets[sparse] = net
    assert nets[True].behaviors.item.weight.grad.is_sparse
    assert nets[True].behaviors.cate.weight.grad.is_sparse
    assert not nets[False].behaviors.item.weight.grad.is_sparse
    for (name, a), b in zip(nets[False].named_parameters(), nets[True].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
