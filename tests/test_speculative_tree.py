"""Draft-tree helpers (efficient_ops.formats.speculative) against a brute-force walk of the parent links, on
chains, stars and random topological trees; malformed trees are rejected with a clear error."""

import pytest
import torch

from efficient_ops.formats.speculative import tree_depths, tree_mask, tree_paths, tree_positions, validate_parents


def random_tree(t, g):
    """parents of a random topological tree of t nodes."""
    return torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, t)])


def trees(batch=3, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    chain = torch.arange(-1, t - 1)
    star = torch.tensor([-1] + [0] * (t - 1))
    return [chain, star] + [random_tree(t, g) for _ in range(batch)] + [torch.tensor([-1])]


def ancestors(parents, i):
    """i and its ancestors, by walking the parent links (the independent implementation)."""
    out = [i]
    while parents[out[-1]] >= 0:
        out.append(int(parents[out[-1]]))
    return out


@pytest.mark.parametrize("parents", trees())
def test_mask_depth_positions_paths_match_a_walk(parents):
    t = parents.numel()
    mask = tree_mask(parents)[0]
    depth = tree_depths(parents)[0]
    for i in range(t):
        anc = ancestors(parents.tolist(), i)
        assert mask[i].nonzero().flatten().tolist() == sorted(anc)
        assert depth[i] == len(anc) - 1
    assert tree_positions(parents, torch.tensor([5, 0])).tolist() == [(5 + depth).tolist(), depth.tolist()]
    leaves = [i for i in range(t) if i not in parents.tolist()]
    paths = tree_paths(parents)[0]
    assert paths.shape == (len(leaves), int(depth.max()) + 1)
    for row, leaf in zip(paths.tolist(), leaves):
        path = ancestors(parents.tolist(), leaf)[::-1]
        assert row == path + [-1] * (paths.shape[1] - len(path))


def test_batched_trees_pad_paths():
    a = torch.arange(-1, 5)                      # a chain: 1 leaf, depth 5
    b = torch.tensor([-1, 0, 0, 0, 1, 2])        # 3 leaves, depth 2
    parents = torch.stack([a, b])
    paths = tree_paths(parents)
    assert paths.shape == (2, 3, 6)
    assert paths[0].tolist() == [[0, 1, 2, 3, 4, 5], [-1] * 6, [-1] * 6]
    assert paths[1].tolist() == [[0, 3, -1, -1, -1, -1], [0, 1, 4, -1, -1, -1], [0, 2, 5, -1, -1, -1]]
    mask = tree_mask(parents)
    assert mask.shape == (2, 6, 6) and torch.equal(mask[0], torch.ones(6, 6, dtype=torch.bool).tril())


@pytest.mark.parametrize("parents, error, match", [
    (torch.tensor([0, 0, 1]), ValueError, "root"),
    (torch.tensor([-1, 1, 0]), ValueError, "node 1 of batch row 0 has parent 1"),
    (torch.tensor([[-1, 0, 0], [-1, 0, 3]]), ValueError, "node 2 of batch row 1 has parent 3"),
    (torch.tensor([-1, -1, 0]), ValueError, "node 1"),
    (torch.tensor([-1.0, 0.0]), TypeError, "integer"),
    (torch.zeros(2, 0, dtype=torch.long), ValueError, "T >= 1"),
])
def test_malformed_trees_are_rejected(parents, error, match):
    with pytest.raises(error, match=match):
        validate_parents(parents)
    with pytest.raises(error, match=match):
        tree_mask(parents)


def test_positions_check_the_batch():
    with pytest.raises(ValueError, match="prefix_lens"):
        tree_positions(torch.tensor([[-1, 0], [-1, 0]]), torch.tensor([1, 2, 3]))
