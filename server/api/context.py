"""What every API handler needs, built once at start-up and stored on `app.state.ctx`."""

from __future__ import annotations

from dataclasses import dataclass, field

from router.cluster import Cluster
from server.api.errors import APIError
from server.metrics import ServerMetrics
from server.models.tokenizer import Tokenizer


@dataclass
class ServerConfig:
    served_model_names: list[str] = field(default_factory=list)  # empty: the engine's name
    api_key: str | None = None
    max_pending_requests: int = 0  # engine requests in flight before 429; <= 0: no limit
    debug_endpoints: bool = False  # GET /debug/integrity


@dataclass
class ServerContext:
    config: ServerConfig
    tokenizer: Tokenizer
    cluster: Cluster
    metrics: ServerMetrics
    created: int = 0  # unix time the server started (the models' "created")
    _token_text: dict[int, str] = field(default_factory=dict, repr=False)

    @property
    def model_names(self) -> list[str]:
        """Names clients may send as `model`; the first is the one responses report."""
        if self.config.served_model_names:
            return self.config.served_model_names
        model = self.cluster.registry.model
        return [model.model_name] if model else []

    @property
    def model_name(self) -> str:
        names = self.model_names
        return names[0] if names else ""

    @property
    def max_model_len(self) -> int:
        """The context every worker agreed on in its handshake (their --max-model-len, capped
        by their KV cache)."""
        model = self.cluster.registry.model
        if model is None:
            raise APIError(503, "No inference worker is ready; try again shortly.", retry_after=5)
        return model.max_model_len

    @property
    def vocab_size(self) -> int | None:
        model = self.cluster.registry.model
        return model.vocab_size if model else None

    def check_model(self, requested: str | None) -> None:
        """404 for a model this server does not serve (None means the default)."""
        if requested is None or requested in self.model_names:
            return
        if not self.model_names:
            raise APIError(503, "No inference worker is ready; try again shortly.", retry_after=5)
        raise APIError(
            404,
            f"The model `{requested}` does not exist. Available: {', '.join(self.model_names)}.",
            param="model",
            code="model_not_found",
        )

    def token_text(self, token_id: int) -> str:
        """The text of one token (special tokens spelled out), cached: for logprobs."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode(
                [token_id], skip_special_tokens=False
            )
        return text
