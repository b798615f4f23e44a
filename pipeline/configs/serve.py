"""The configs of scoring with an export: `urm score` (a file, batched) and `urm serve` (HTTP, batched
dynamically)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.configs.options import ConfigError, check, group, number, one_of, opt, whole
from pipeline.configs.runtime import Reading, Runtime

REWARD_HELP = ("The reward to give: mean (the score; subtracts no uncertainty), lcb (score - risk x score_std: "
               "aleatoric, the ratings' noise, about the same for every response), elcb (score - risk x epistemic_std: "
               "epistemic, the ridge posterior's std, which grows for responses unlike the training rows), min (the "
               "worst ensemble member's score) or uwo (the members' mean - risk x their variance), both epistemic; "
               "min and uwo need an export with an ensemble, elcb one with a ridge posterior (--loss ridge).")
RISK_HELP = "The risk parameter of --reward lcb and elcb (k) and uwo (lambda): a number from 0 to 1e6."


def check_reward(reward: str, risk: float) -> None:
    """--reward is a transform pipeline.model.rewards knows, --risk a number from 0 to 1e6 (``MAX_RISK``)."""
    from pipeline.model.rewards import RISK_RANGE, TRANSFORMS, risk_ok

    one_of(reward, TRANSFORMS, "reward")
    check(risk_ok(risk), "risk", risk, RISK_RANGE)


def check_api_key(key: str | None) -> None:
    """A key a client can send in an HTTP header: visible ASCII, no spaces (the key itself is never echoed)."""
    if key is not None and not (isinstance(key, str) and key and all("!" <= c <= "~" for c in key)):
        raise ConfigError("--api-key (or URM_API_KEY) must be a non-empty string of visible ASCII characters "
                          "without spaces (the key is not shown here)")


@dataclass
class ScoreConfig:
    """`urm score`: batched scoring with uncertainty from an exported model directory."""

    input: str | None = opt(None, "Conversations or chosen/rejected pairs to score (a file, a hub dataset, "
                            "synthetic:...). Required.", short="-i")
    output: str | None = opt(None, "The JSONL file to write (default: stdout).", short="-o")
    runtime: Runtime = group(Runtime(), "")
    reading: Reading = group(Reading(), "")
    overwrite: bool = opt(False, "Replace an --output file that is there and is not an earlier `urm score` output (an "
                          "earlier output is replaced anyway; an input of the run never is).")
    reward: str = opt("mean", REWARD_HELP + " Each row gets it as `reward` (each side of a pair too).")
    risk: float = opt(1.0, RISK_HELP)

    def __post_init__(self):
        check_reward(self.reward, self.risk)


@dataclass
class ServeConfig:
    """`urm serve`: an exported model behind HTTP, requests batched dynamically (pipeline.serve)."""

    host: str = opt("127.0.0.1", "Address to listen on. Loopback by default: without --api-key the server has no "
                    "authentication, so serving on another address (0.0.0.0, ...) exposes the model to whoever can "
                    "reach it.")
    port: int = opt(8000, "Port to listen on (0 picks a free one; the address is printed).", shown="8000")
    runtime: Runtime = group(Runtime(), "")
    max_length: int | None = opt(None, "Refuse (HTTP 422) conversations longer than this many tokens (default: the "
                                 "longest the heads were trained on, from the export; never more than the backbone's "
                                 "positions).")
    max_wait_ms: float = opt(5.0, "Dynamic batching: how long the first waiting request waits for others to join its "
                             "batch (milliseconds, 0 to 60000; a batch also starts once it fills the token budget).")
    dynamic_batching: bool = opt(True, "Batch requests that arrive together; --no-dynamic-batching scores one request "
                                 "at a time (for comparison).")
    max_items: int = opt(256, "Most conversations (or queries) in one request; more is refused with HTTP 413.")
    max_queue: int = opt(4096, "Most conversations waiting to be scored; a request that would exceed it gets HTTP 503 "
                         "(retry later) instead of growing memory.")
    max_body_mb: float = opt(16.0, "Largest request body in MiB (at most 65536); larger is refused with HTTP 413.")
    reward: str = opt("mean", REWARD_HELP + " /get_reward's `rewards` and /score's `reward` carry it; a request "
                      "may ask for another with \"reward\" and \"risk\" in its JSON body.")
    risk: float = opt(1.0, RISK_HELP)
    api_key: str | None = opt(None, "Require `Authorization: Bearer KEY` on every request (HTTP 401 otherwise, "
                              "nothing scored), as vLLM and SGLang do; set it with URM_API_KEY rather than on the "
                              "command line, where other users of the machine can read it. An empty or blank key "
                              "(URM_API_KEY= included) is refused, never taken for none.", secret=True)
    open_health: bool = opt(False, "With --api-key: leave GET /health open to callers without the key (for a load "
                            "balancer's probe); by default it needs the key too. Without a key it is refused: "
                            "everything is open then.")

    def __post_init__(self):
        check_reward(self.reward, self.risk)
        check_api_key(self.api_key)
        check(isinstance(self.host, str) and self.host.strip() != "", "host", self.host, "an address")
        whole(self.port, "port", least=0)
        check(self.port <= 65535, "port", self.port, "at most 65535")
        whole(self.max_length, "max_length", allow_none=True)
        check(number(self.max_wait_ms) and 0 <= self.max_wait_ms <= 60_000, "max_wait_ms", self.max_wait_ms,
              "a number of milliseconds from 0 to 60000 (a minute)")
        whole(self.max_items, "max_items")
        whole(self.max_queue, "max_queue")
        check(self.max_queue >= self.max_items, "max_queue", self.max_queue,
              f"at least --max-items ({self.max_items}), or a full request could never be queued")
        check(number(self.max_body_mb) and 0 < self.max_body_mb <= 65_536, "max_body_mb", self.max_body_mb,
              "a positive number of MiB, at most 65536 (64 GiB)")
