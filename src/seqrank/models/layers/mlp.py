"""Feed-forward stacks and the activations the papers use."""

from __future__ import annotations

from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "leaky_relu": nn.LeakyReLU,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "prelu": nn.PReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}


def make_activation(name: str) -> nn.Module:
    """Build an activation module by name.

    Args:
        name: one of the keys of `ACTIVATIONS`.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is not one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class MLP(nn.Module):
    """Linear -> activation -> dropout per hidden layer, then a Linear output layer.

    Args:
        in_dim: input width.
        dims: hidden widths, e.g. (1024, 512, 256); may be empty (a single Linear).
        out_dim: output width.
        activation: activation name (see `ACTIVATIONS`).
        dropout: dropout after each hidden activation.
    """

    def __init__(
        self,
        in_dim: int,
        dims: tuple[int, ...],
        *,
        out_dim: int = 1,
        activation: str = "leaky_relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got dropout={dropout}")
        layers: list[nn.Module] = []
        width = in_dim
        for dim in dims:
            if dim < 1:
                raise ValueError(f"MLP hidden widths must be >= 1, got dims={tuple(dims)}")
            layers += [nn.Linear(width, dim), make_activation(activation), nn.Dropout(dropout)]
            width = dim
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Args:
            x: (..., in_dim).

        Returns:
            (..., out_dim).
        """
        return self.net(x)
