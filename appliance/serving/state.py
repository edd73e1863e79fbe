"""What every endpoint shares: the engine, its scheduler, the keys and the limits (auth.py checks the keys)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from appliance.serving.client_keys import ClientKeys
from appliance.serving.scheduler import Scheduler
from models.engine import Engine, Generation
from models.lora import Adapters, LoraAdapter
from models.sampling import InvalidParameterError, SamplingParams
from models.store import model_aliases
from offload.pki import CertificateAuthority

TAG = ":latest"  # Ollama's default tag: "NAME" and "NAME:latest" are the same model


@dataclass
class ServerState:
    engine: Engine
    scheduler: Scheduler
    model_name: str
    api_keys: frozenset[str] = frozenset()  # empty: no authentication (--no-auth)
    admin_keys: frozenset[str] = frozenset()  # load/unload and device management
    client_keys: ClientKeys | None = None  # named keys made and revoked while running (appliance-ctl keys)
    admin_ca: CertificateAuthority | None = None  # --admin-mtls: administration also needs a certificate from it
    default_max_tokens: int = 256
    max_tokens_limit: int = 4096
    max_body_bytes: int = 1 << 20
    started: int = field(default_factory=lambda: int(time.time()))
    adapters: Adapters | None = None  # LoRA adapters served as MODEL+ADAPTER (made empty when not given)

    def __post_init__(self) -> None:
        if self.adapters is None:
            self.adapters = Adapters(self.engine.model.file, self.engine.model.config.spec)

    def model_names(self) -> list[str]:
        """What requests may name: the base model, and BASE+ADAPTER for each adapter loaded now."""
        return [self.model_name, *(f"{self.model_name}+{n}" for n in self.adapters.names())]

    def adapter_for(self, name: str) -> LoraAdapter | None:
        """The adapter a model name picks (None: the base model); LookupError for a name not served. The
        base may be any spelling `serves` accepts, the adapter's name any case (Ollama's names ignore it)."""
        base, plus, adapter = name.removesuffix(TAG).partition("+")
        if not self.serves(base):
            raise LookupError(name)
        if not plus:
            return None
        adapter = next((n for n in self.adapters.names() if n.casefold() == adapter.casefold()), adapter)
        found = self.adapters.get(adapter)
        if found is None:
            raise LookupError(name)
        return found  # layers on offload workers get their part of it there (offload/coordinator.py)

    def served_name(self, name: str) -> str:
        """A served model name as the server lists it: the base's one name, and the adapter's as loaded."""
        adapter = self.adapter_for(name)
        return self.model_name if adapter is None else f"{self.model_name}+{adapter.name}"

    def serves(self, name: str) -> bool:
        """Whether a request's model name is this model's: its name or another spelling of it (the file's stem or
        name, any case, with or without Ollama's ":latest")."""
        aliases = model_aliases(self.engine.model.file.path) | {self.model_name.casefold()}
        return name.removesuffix(TAG).casefold() in aliases

    def canonical(self, name: str) -> str:
        """A model name as the server lists it (`NAME-logits` too, KServe's scoring model), else `name` itself."""
        base, logits = (name[: -len("-logits")], "-logits") if name.endswith("-logits") else (name, "")
        return self.model_name + logits if self.serves(base) else name

    def generation(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        max_tokens: int | None,
        stop: list[str],
        ignore_eos: bool = False,
        max_tokens_field: str = "max_tokens",
        logprobs: int | None = None,
        echo: bool = False,
        model: str | None = None,
        grammar: str | None = None,
    ) -> Generation:
        """A generation within this server's limits (every protocol's requests pass through here);
        max_tokens_field: what the protocol calls max_tokens, for the error that names it; logprobs,
        echo: models.engine.Generation's; model: the name the request gave, which picks its adapter
        (checked before, so LookupError here is a bug); grammar: a compiled grammar (engine.grammars) the
        text must follow, each generation with its own matcher."""
        max_tokens = min(self.default_max_tokens, self.max_tokens_limit) if max_tokens is None else max_tokens
        if max_tokens > self.max_tokens_limit:
            raise InvalidParameterError(
                f"{max_tokens_field} is {max_tokens}; this server allows at most {self.max_tokens_limit}"
            )
        if len(stop) > 16:
            raise InvalidParameterError("at most 16 stop strings")
        adapter = None if model is None else self.adapter_for(model)
        constraint = None if grammar is None else self.engine.grammars.constraint(grammar)
        return self.engine.generate(
            prompt_ids,
            sampling,
            max_tokens,
            stop,
            ignore_eos=ignore_eos,
            logprobs=logprobs,
            echo=echo,
            constraint=constraint,
            adapter=adapter,
        )


def server_state(request: Request) -> ServerState:
    return request.app.state.appliance
