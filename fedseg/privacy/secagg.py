"""Secure aggregation, SecAgg(+) (Bonawitz et al. 2017; Bell et al. 2020), transport-independent.

Why our own: Flower 1.42's SecAgg+ only runs on the legacy API, masks with NumPy's Mersenne
Twister seeded from 32 bits, accepts unauthenticated keys, uploads int64 and costs minutes per
round at nnU-Net size (see docs/flower-1.42.md). No maintained Python library implements the
protocol on audited primitives, so the protocol logic is written here while every primitive comes
from ``cryptography`` (ECDSA P-384, X25519, HKDF-SHA256, AES-256-GCM, AES-256-CTR) and all
secret randomness from the OS CSPRNG. Each step is a method over pydantic messages (bytes as
base64/hex strings) and returns the next message, so the federation can carry them in Flower
messages (JSON in a ConfigRecord, the masked vector in an ArrayRecord) — nothing here knows
about Flower.

Protocol of one aggregation ("round", identified by a round id that must never repeat: include
the Flower run id, e.g. ``f"{run_id}/train/{r}"``):

0. advertise  site → server  ``SecAggSite.advertise(round_id) -> KeyAdvertisement``: two fresh
   X25519 pairs (c: encrypts shares, s: pairwise masks), a fresh self-mask seed b and a SHA-256
   commitment to it, signed (site, round id, c_pk, s_pk, commitment, config digest) with the
   site's long-term ECDSA P-384 identity key (its Flower SuperNode-auth key).
   ``SecAggServer.advertisements([...]) -> ShareKeysRequest`` (the valid advertisements, ≥ t).
1. share keys  server → site ``ShareKeysRequest``; site → server ``ShareKeysReply``:
   ``SecAggSite.share_keys(req)`` verifies EVERY advertisement against the roster (a swapped,
   re-signed or replayed key aborts the round at the site: ``SecAggAbort``), Shamir-splits b and
   the s private key t-of-n, and encrypts each peer's shares with AES-GCM under
   HKDF(X25519(c_i, c_j)), associated data = (round, sender, recipient).
   ``SecAggServer.relay_shares([...]) -> {site: MaskRequest}`` (ciphertexts only).
2. masked input  server → site ``MaskRequest`` (with the model); site → server ``MaskedInput`` +
   uint32 vector: ``SecAggSite.mask(req, values, ints)`` decrypts/authenticates its shares, then
   quantises the float vector, appends the integers (sample count ...), adds the self mask and
   ± the pairwise masks with every peer whose shares it received, mod 2^32.
   ``SecAggServer.add_masked(meta, vector)`` accumulates the ring sum (O(L) memory).
3. unmask  server → site ``UnmaskRequest`` (survivors U, dropped D);
   site → server ``UnmaskReply``: ``SecAggSite.unmask(req)`` answers ONCE per round, only if
   U ∩ D = ∅, |U| ≥ t, the site itself is in U and U ∪ D are exactly its mask peers: shares of b_u
   for u ∈ U, shares of s_d for d ∈ D — never both for one site.
   ``SecAggServer.unmask([...]) -> AggregateResult``: with ≥ t shares for every u and d (else
   ``SecAggAbort`` and nothing is unmasked), reconstructs b_u (checked against its commitment) and
   s_d (checked against its advertised public key), removes the masks, dequantises: the exact
   sum of the survivors' quantised vectors and the exact integer sums.

Folding into the federation (≤ 1 extra exchange per round over plain FedAvg): steps 0 and 1 of
round r+1 only need public data, so they ride on round r's messages:
    TRAIN_r     server → site: model + MaskRequest(r)
                site → server: MaskedInput(r) + vector  +  KeyAdvertisement(r+1)
    UNMASK_r    server → site: UnmaskRequest(r)  +  ShareKeysRequest(r+1)
                site → server: UnmaskReply(r)    +  ShareKeysReply(r+1)
(fedseg carries UNMASK_r outside Flower when it can, so a round costs no extra Flower exchange:
``fedseg/server/secure_rounds.py``.)
Round 1's advertisement and share keys ride on the pre-training messages (e.g. enrol/prepare).
A site keeps several rounds at once in :class:`SiteState` (a pydantic model to persist between
ClientApp processes, e.g. in the SuperNode-side ``Context.state``; it holds the round's private
keys, so it must stay on the site).

Security notes:
- Honest-but-curious server: it learns only the sum over ≥ t sites. Fewer than t colluding
  sites learn nothing about another site's shares.
- Active server: it cannot swap or replay per-round keys (signed, round-bound, checked against
  the roster by every site; the site's own advertisement must come back unchanged). It could try
  telling different sites different (U, D) to collect t shares of b_u AND t of s_u; each site
  answers only one (U, D) per round, so this needs two disjoint groups of t answering sites.
  With c sites colluding with the server that is possible only if 2(t - c) ≤ n - c, i.e.
  2t ≤ n + c. The config requires 2t > n, which defeats a malicious server acting alone; against
  a server colluding with c sites choose 2t > n + c (n = 5: t = 3 → c = 0, t = 4 → c ≤ 2; more
  threshold = less dropout tolerance, n - t sites may drop). Bonawitz's "consistency check" round
  (signatures over U) would remove the condition at the cost of one more exchange per round; we
  do not run it.
- A round id is single-use per site and a site masks at most one input per round (a second input
  under the same masks would reveal the difference of the two).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal, NoReturn, Protocol

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from fedseg.errors import FedsegError
from fedseg.privacy import keys as _keys
from fedseg.privacy import masking, shamir
from fedseg.privacy.buffers import BufferPool
from fedseg.privacy.keys import (
    SEED_BYTES,
    SecAggAbort,
    b64d,
    b64e,
    generate_identity_key,
    identity_public_pem,
    load_identity_private_key,
    load_identity_public_key,
    pairwise_seed,
)

__all__ = [
    "AggregateResult",
    "CLIP_COUNT_FIELD",
    "EncryptedShare",
    "KeyAdvertisement",
    "MaskRequest",
    "MaskedInput",
    "SecAggAbort",
    "SecAggConfig",
    "SecAggServer",
    "SecAggSite",
    "ShareKeysReply",
    "ShareKeysRequest",
    "ShareValue",
    "SiteState",
    "UnmaskReply",
    "UnmaskRequest",
    "generate_identity_key",
    "identity_public_pem",
    "load_identity_private_key",
    "load_identity_public_key",
    "pairwise_seed",
    "verify_advertisement",
]

CLIP_COUNT_FIELD = "_num_clipped"  # appended by every site: the (masked) number of clipped values
_MAX_RECOMBINATIONS = 2000  # subsets tried when some shares are corrupt
_ADD_BLOCK = 1 << 20  # values per block when a masked upload is added into the sum (4 MiB)

SiteName = Annotated[str, Field(min_length=1, max_length=200)]
RoundId = Annotated[str, Field(min_length=1, max_length=256)]


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _State(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- configuration


class SecAggConfig(_Msg):
    """Consortium-wide settings. Every site reads them from ITS OWN configuration, never from the
    server (a server could otherwise lower the threshold); the digest of the config is signed in
    each advertisement, so a mismatch between sites aborts the round with a clear message."""

    roster: dict[SiteName, str] = Field(description="site name -> ECDSA P-384 public key (OpenSSH or PEM)")
    threshold: int = Field(description="t: shares needed to unmask; 2t > number of sites")
    clip: float = Field(gt=0, description="C: values are clipped to [-C, C] before quantisation")

    _public: dict[str, ec.EllipticCurvePublicKey] = PrivateAttr(default_factory=dict)
    _digest: str = PrivateAttr(default="")

    @model_validator(mode="after")
    def _check(self) -> SecAggConfig:
        n = len(self.roster)
        if n < 2:
            raise ValueError("secure aggregation needs at least 2 sites in the roster")
        if not (n // 2 + 1 <= self.threshold <= n):
            raise ValueError(
                f"threshold must be between {n // 2 + 1} (a majority of the {n} sites) and {n}, "
                f"got {self.threshold}"
            )
        if not math.isfinite(self.clip):
            raise ValueError("clip must be finite")
        return self

    def model_post_init(self, context: object, /) -> None:
        parts: list[str | bytes | int] = [
            _keys.PROTOCOL_TAG,
            "config",
            self.threshold,
            float(self.clip).hex(),
        ]
        for name in sorted(self.roster):
            try:
                key = load_identity_public_key(self.roster[name])
            except FedsegError as err:
                raise FedsegError(f"roster entry for site {name!r}: {err}") from err
            self._public[name] = key
            parts += [name, _keys.public_key_der(key)]
        self._digest = hashlib.sha256(_keys.encode_fields(*parts)).hexdigest()

    @property
    def num_sites(self) -> int:
        return len(self.roster)

    @property
    def digest(self) -> str:
        return self._digest

    def public_key(self, site: str) -> ec.EllipticCurvePublicKey:
        return self._public[site]

    def x_of(self, site: str) -> int:
        """The site's Shamir evaluation point: 1-based position in the sorted roster."""
        return sorted(self.roster).index(site) + 1

    @property
    def quantization_step(self) -> float:
        return masking.quantization_step(self.clip, self.num_sites)

    @property
    def int_max(self) -> int:
        """Largest integer one site may append (sums of all sites stay below 2^32)."""
        return masking.int_field_max(self.num_sites)


# --------------------------------------------------------------------------- messages


class KeyAdvertisement(_Msg):
    """Step 0, site → server (→ every site): the site's public keys for one round, signed."""

    site: SiteName
    round_id: RoundId
    c_pk: str = Field(description="X25519 public key for share encryption (base64, 32 bytes)")
    s_pk: str = Field(description="X25519 public key for pairwise masks (base64, 32 bytes)")
    b_commit: str = Field(description="SHA-256 commitment to the self-mask seed (base64)")
    config_digest: str = Field(description="SecAggConfig.digest of the signing site")
    signature: str = Field(description="ECDSA P-384/SHA-384 over all the above (base64, DER)")


class ShareKeysRequest(_Msg):
    """Step 1, server → each site: all advertisements the server accepted for the round."""

    round_id: RoundId
    advertisements: list[KeyAdvertisement]


class EncryptedShare(_Msg):
    """A sender's Shamir shares (of b and of the s private key) for one recipient, AES-256-GCM."""

    round_id: RoundId
    sender: SiteName
    recipient: SiteName
    nonce: str = Field(description="base64, 12 bytes")
    ciphertext: str = Field(description="base64")


class ShareKeysReply(_Msg):
    """Step 1, site → server: one ciphertext per peer (the server relays them unread)."""

    site: SiteName
    round_id: RoundId
    shares: list[EncryptedShare]


class MaskRequest(_Msg):
    """Step 2, server → one site: the ciphertexts addressed to it and the layout of the vector."""

    site: SiteName
    round_id: RoundId
    float_length: int = Field(ge=0, description="length of the float vector (model delta)")
    int_fields: dict[str, int] = Field(description="exactly-summed integer fields: name -> length, in order")
    shares: list[EncryptedShare]

    @field_validator("int_fields")
    @classmethod
    def _fields(cls, v: dict[str, int]) -> dict[str, int]:
        return _check_int_fields(v)

    @property
    def vector_length(self) -> int:
        """Length of the masked upload: floats, int fields, the clip count."""
        return self.float_length + sum(self.int_fields.values()) + 1


class MaskedInput(_Msg):
    """Step 2, site → server; the uint32 vector travels next to it (ArrayRecord). Layout:
    [float_length quantised values | int fields in order | 1 clip count]."""

    site: SiteName
    round_id: RoundId
    peers: list[SiteName] = Field(description="the sites this site exchanged pairwise masks with")
    float_length: int
    int_fields: dict[str, int]
    config_digest: str


class UnmaskRequest(_Msg):
    """Step 3, server → surviving sites: who uploaded (U) and who dropped after sharing keys (D)."""

    round_id: RoundId
    survivors: list[SiteName]
    dropped: list[SiteName]


class ShareValue(_Msg):
    x: int = Field(gt=0, description="the holder's evaluation point")
    y: str = Field(description="share value, hex (66 bytes)")


class UnmaskReply(_Msg):
    """Step 3, site → server: shares of b_u for u ∈ U and of s_d for d ∈ D."""

    site: SiteName
    round_id: RoundId
    self_mask_shares: dict[SiteName, ShareValue]
    key_shares: dict[SiteName, ShareValue]


class _SharePlaintext(_Msg):
    round_id: RoundId
    sender: SiteName
    recipient: SiteName
    x: int
    b_share: str
    s_share: str


# --------------------------------------------------------------------------- site state

Stage = Literal["advertised", "shared", "masked", "answered", "aborted"]


class HeldShare(_State):
    x: int
    b_share: str
    s_share: str


class RoundState(_State):
    """One round at one site. Holds secrets (hex) until the round ends or aborts."""

    round_id: str
    stage: Stage = "advertised"
    c_sk: str = ""
    s_sk: str = ""
    b: str = ""
    advertisement: KeyAdvertisement
    verified: dict[str, KeyAdvertisement] = Field(default_factory=dict)
    share_request: ShareKeysRequest | None = None
    share_reply: ShareKeysReply | None = None
    held: dict[str, HeldShare] = Field(default_factory=dict)
    masked_peers: list[str] = Field(default_factory=list)
    unmask_request: UnmaskRequest | None = None
    unmask_reply: UnmaskReply | None = None
    abort_reason: str = ""


class SiteState(_State):
    """Everything a site must keep between protocol steps (persist it as JSON, site-side only)."""

    site: str
    used_rounds: list[str] = Field(default_factory=list)
    rounds: dict[str, RoundState] = Field(default_factory=dict)


# --------------------------------------------------------------------------- shared checks


def _check_int_fields(v: dict[str, int]) -> dict[str, int]:
    if CLIP_COUNT_FIELD in v:
        raise ValueError(f"{CLIP_COUNT_FIELD!r} is reserved")
    for name, length in v.items():
        if not name or length < 1:
            raise ValueError(f"int field {name!r} needs a name and a length >= 1")
    return v


def verify_advertisement(config: SecAggConfig, adv: KeyAdvertisement, round_id: str) -> None:
    """Raise SecAggAbort unless ``adv`` was signed for ``round_id`` by its site's roster key."""
    who = f"the advertisement of site {adv.site!r}"
    if adv.site not in config.roster:
        raise SecAggAbort(f"{who} comes from a site that is not in the consortium roster")
    if adv.round_id != round_id:
        raise SecAggAbort(
            f"{who} is for round {adv.round_id!r}, not {round_id!r} (a replayed advertisement?)"
        )
    c_pk = b64d(adv.c_pk, f"{who}: c_pk", 32)
    s_pk = b64d(adv.s_pk, f"{who}: s_pk", 32)
    commit = b64d(adv.b_commit, f"{who}: b_commit", 32)
    sig = b64d(adv.signature, f"{who}: signature")
    payload = _keys.advertisement_payload(adv.site, adv.round_id, c_pk, s_pk, commit, adv.config_digest)
    if not _keys.verify(config.public_key(adv.site), sig, payload):
        raise SecAggAbort(
            f"{who} for round {round_id!r} does not verify against that site's roster key: its round "
            "keys were substituted, re-signed or replayed (by the server or the network); refusing the round"
        )
    if adv.config_digest != config.digest:
        raise SecAggAbort(
            f"site {adv.site!r} uses a different secure-aggregation configuration (roster, threshold or "
            "clip differ from this one); all sites must use the same"
        )
    if c_pk == s_pk:
        raise SecAggAbort(f"{who} reuses one key for both purposes")


def _xpub(b64: str) -> X25519PublicKey:
    return X25519PublicKey.from_public_bytes(b64d(b64, "X25519 public key", 32))


def _check_names(names: list[str], what: str) -> set[str]:
    s = set(names)
    if len(s) != len(names):
        raise SecAggAbort(f"{what} lists a site twice")
    return s


# --------------------------------------------------------------------------- site


class SecAggSite:
    """The site side of the protocol. Construct it per message from the consortium config, the
    site's identity key and the persisted :class:`SiteState`; each step mutates ``self.state``."""

    def __init__(
        self,
        config: SecAggConfig,
        site: str,
        identity_key: ec.EllipticCurvePrivateKey,
        state: SiteState | None = None,
    ) -> None:
        if site not in config.roster:
            raise FedsegError(f"site {site!r} is not in the secure-aggregation roster")
        if _keys.public_key_der(identity_key.public_key()) != _keys.public_key_der(config.public_key(site)):
            raise FedsegError(f"this site's identity key does not match the roster entry for {site!r}")
        if state is not None and state.site != site:
            raise ValueError(f"state belongs to site {state.site!r}, not {site!r}")
        self.config = config
        self.site = site
        self._identity = identity_key
        self.state = state if state is not None else SiteState(site=site)

    # ---- step 0
    def advertise(self, round_id: str) -> KeyAdvertisement:
        """Fresh round keys, signed. Safe to call ahead of time (next round) and idempotent."""
        rs = self.state.rounds.get(round_id)
        if rs is not None and rs.stage != "aborted":
            return rs.advertisement
        if round_id in self.state.used_rounds:
            raise SecAggAbort(
                f"site {self.site!r}: round id {round_id!r} was already used; round ids must never repeat"
            )
        for rid in [r for r, st in self.state.rounds.items() if st.stage in ("answered", "aborted")]:
            del self.state.rounds[rid]
        c, s, b = _keys.new_x25519(), _keys.new_x25519(), _keys.new_self_mask_seed()
        c_pk, s_pk = _keys.x25519_public_bytes(c), _keys.x25519_public_bytes(s)
        commit = _keys.self_mask_commitment(round_id, self.site, b)
        sig = _keys.sign(
            self._identity,
            _keys.advertisement_payload(self.site, round_id, c_pk, s_pk, commit, self.config.digest),
        )
        adv = KeyAdvertisement(
            site=self.site,
            round_id=round_id,
            c_pk=b64e(c_pk),
            s_pk=b64e(s_pk),
            b_commit=b64e(commit),
            config_digest=self.config.digest,
            signature=b64e(sig),
        )
        self.state.used_rounds.append(round_id)
        self.state.rounds[round_id] = RoundState(
            round_id=round_id,
            c_sk=_keys.x25519_private_bytes(c).hex(),
            s_sk=_keys.x25519_private_bytes(s).hex(),
            b=b.hex(),
            advertisement=adv,
        )
        return adv

    # ---- step 1
    def share_keys(self, req: ShareKeysRequest) -> ShareKeysReply:
        """Verify every advertisement against the roster; encrypt Shamir shares to each peer."""
        rs = self._round(req.round_id, ("advertised", "shared"), "share keys")
        if rs.stage == "shared":
            if req == rs.share_request and rs.share_reply is not None:
                return rs.share_reply
            self._fail(rs, "the server sent a second, different key list for this round")
        by_site: dict[str, KeyAdvertisement] = {}
        for adv in req.advertisements:
            try:
                verify_advertisement(self.config, adv, req.round_id)
            except SecAggAbort as err:
                self._fail(rs, str(err))
            if adv.site in by_site:
                self._fail(rs, f"the key list contains site {adv.site!r} twice")
            by_site[adv.site] = adv
        if by_site.get(self.site) != rs.advertisement:
            self._fail(rs, "the key list does not contain this site's own advertisement unchanged")
        t = self.config.threshold
        if len(by_site) < t:
            self._fail(rs, f"only {len(by_site)} sites advertised keys, fewer than the threshold {t}")
        pubs = [k for a in by_site.values() for k in (a.c_pk, a.s_pk)]
        if len(set(pubs)) != len(pubs):
            self._fail(rs, "two advertisements carry the same public key (a copied key)")

        names = sorted(by_site)
        xs = {n: self.config.x_of(n) for n in names}
        b_sh = shamir.split(bytes.fromhex(rs.b), list(xs.values()), t)
        s_sh = shamir.split(bytes.fromhex(rs.s_sk), list(xs.values()), t)
        c_sk = X25519PrivateKey.from_private_bytes(bytes.fromhex(rs.c_sk))
        shares: list[EncryptedShare] = []
        for peer in names:
            x = xs[peer]
            if peer == self.site:
                continue
            plain = _SharePlaintext(
                round_id=req.round_id,
                sender=self.site,
                recipient=peer,
                x=x,
                b_share=shamir.share_to_hex(b_sh[x]),
                s_share=shamir.share_to_hex(s_sh[x]),
            )
            key = _keys.share_encryption_key(c_sk, _xpub(by_site[peer].c_pk), req.round_id, self.site, peer)
            nonce = os.urandom(12)
            ct = AESGCM(key).encrypt(
                nonce,
                plain.model_dump_json().encode(),
                _keys.share_associated_data(req.round_id, self.site, peer),
            )
            shares.append(
                EncryptedShare(
                    round_id=req.round_id,
                    sender=self.site,
                    recipient=peer,
                    nonce=b64e(nonce),
                    ciphertext=b64e(ct),
                )
            )
        own_x = xs[self.site]
        reply = ShareKeysReply(site=self.site, round_id=req.round_id, shares=shares)
        rs.held = {
            self.site: HeldShare(
                x=own_x, b_share=shamir.share_to_hex(b_sh[own_x]), s_share=shamir.share_to_hex(s_sh[own_x])
            )
        }
        rs.verified = by_site
        rs.share_request = req
        rs.share_reply = reply
        rs.stage = "shared"
        return reply

    # ---- step 2
    def mask(
        self,
        req: MaskRequest,
        values: np.ndarray | Mapping[str, np.ndarray],
        ints: Mapping[str, int | Iterable[int] | np.ndarray],
        *,
        weight: float = 1.0,
        out: np.ndarray | None = None,
    ) -> tuple[MaskedInput, np.ndarray]:
        """The masked upload: ``weight`` × ``values`` (float, the clipped sample-weighted delta:
        one array of any shape, flattened, or a mapping of arrays taken in sorted-key order and
        never concatenated) and ``ints`` (non-negative integers per ``req.int_fields``, e.g.
        ``{"num_samples": 120}``) → (metadata, uint32 vector of length
        float_length + Σ int lengths + 1). ``out``: a uint32 buffer of that length to write the
        vector into (a site reuses one between rounds: no fresh 120 MB per round at 30M
        values); it must not be read by anyone else until the upload is done."""
        rs = self._round(req.round_id, ("shared", "masked", "answered"), "mask")
        if rs.stage != "shared":
            raise SecAggAbort(
                f"site {self.site!r} already uploaded a masked input for round {req.round_id!r}; refusing to "
                "mask a second input under the same masks (the server would learn their difference)"
            )
        if isinstance(values, Mapping):
            parts = [np.asarray(values[k]) for k in sorted(values)]
        else:
            parts = [np.asarray(values).reshape(-1)]
        for p in parts:
            if not np.issubdtype(p.dtype, np.floating):
                raise ValueError(f"values must be float arrays, got {p.dtype}")
        n_values = sum(int(p.size) for p in parts)
        if n_values != req.float_length:
            raise ValueError(f"values have {n_values} elements, the round expects {req.float_length}")
        int_vals = self._int_block(req.int_fields, ints)
        L = req.float_length
        size = req.vector_length
        if out is None:
            out = np.empty(size, dtype=np.uint32)
        elif out.dtype != np.uint32 or out.shape != (size,):
            raise ValueError(f"out must be a uint32 buffer of {size} elements")

        if req.site != self.site:
            self._fail(rs, f"the mask request is addressed to {req.site!r}")
        held = dict(rs.held)
        c_sk = X25519PrivateKey.from_private_bytes(bytes.fromhex(rs.c_sk))
        own_x = self.config.x_of(self.site)
        for sh in req.shares:
            sender = sh.sender
            if sh.round_id != req.round_id or sh.recipient != self.site:
                self._fail(rs, f"a relayed share from {sender!r} is for another round or recipient")
            if sender == self.site or sender not in rs.verified:
                self._fail(rs, f"a relayed share comes from {sender!r}, which is not a verified peer")
            if sender in held:
                self._fail(rs, f"two shares from {sender!r}")
            key = _keys.share_encryption_key(
                c_sk, _xpub(rs.verified[sender].c_pk), req.round_id, sender, self.site
            )
            try:
                raw = AESGCM(key).decrypt(
                    b64d(sh.nonce, "share nonce", 12),
                    b64d(sh.ciphertext, "share ciphertext"),
                    _keys.share_associated_data(req.round_id, sender, self.site),
                )
                plain = _SharePlaintext.model_validate_json(raw)
                for y in (plain.b_share, plain.s_share):
                    shamir.share_from_hex(y)
            except (InvalidTag, ValidationError, ValueError):
                self._fail(rs, f"the share from {sender!r} fails authentication (tampered or mis-addressed)")
            if (plain.round_id, plain.sender, plain.recipient, plain.x) != (
                req.round_id,
                sender,
                self.site,
                own_x,
            ):
                self._fail(rs, f"the share from {sender!r} names another round, sender, recipient or point")
            held[sender] = HeldShare(x=plain.x, b_share=plain.b_share, s_share=plain.s_share)
        peers = sorted(p for p in held if p != self.site)
        if len(peers) + 1 < self.config.threshold:
            self._fail(
                rs,
                f"only {len(peers) + 1} sites shared keys, fewer than the threshold {self.config.threshold}",
            )

        s_sk = X25519PrivateKey.from_private_bytes(bytes.fromhex(rs.s_sk))
        masks: list[tuple[bytes, int]] = [(bytes.fromhex(rs.b), 1)]
        for peer in peers:
            seed = pairwise_seed(s_sk, _xpub(rs.verified[peer].s_pk), req.round_id, self.site, peer)
            masks.append((seed, 1 if self.site < peer else -1))
        streams = masking.MaskStreams(masks)
        # quantised and masked block by block (masking.quantize_parts_into); a NaN raises
        # ValueError before the round's state changes, so nothing masked ever leaves
        clipped = masking.quantize_parts_into(parts, out[:L], self.config.clip,
                                              self.config.num_sites, weight, streams)
        out[L:-1] = int_vals
        out[-1] = min(clipped, self.config.int_max)
        streams.apply(out[L:])
        rs.held = held
        rs.masked_peers = peers
        rs.stage = "masked"
        meta = MaskedInput(
            site=self.site,
            round_id=req.round_id,
            peers=peers,
            float_length=L,
            int_fields=dict(req.int_fields),
            config_digest=self.config.digest,
        )
        return meta, out

    # ---- step 3
    def unmask(self, req: UnmaskRequest) -> UnmaskReply:
        """Shares of b_u (u ∈ U) and of s_d (d ∈ D), answered at most once per round."""
        rs = self._round(req.round_id, ("advertised", "shared", "masked", "answered"), "unmask")
        if rs.stage in ("advertised", "shared"):
            raise SecAggAbort(
                f"site {self.site!r} has not uploaded a masked input in round {req.round_id!r}; it answers "
                "unmask requests only after its own upload"
            )
        if rs.stage == "answered":
            if req == rs.unmask_request and rs.unmask_reply is not None:
                return rs.unmask_reply
            raise SecAggAbort(
                f"site {self.site!r} already answered an unmask request for round {req.round_id!r} with "
                "other survivor/dropped sets; refusing to answer again (two answers could reveal both "
                "the self mask and the mask key of one site)"
            )
        try:
            U = _check_names(req.survivors, "the survivor list")
            D = _check_names(req.dropped, "the dropped list")
        except SecAggAbort as err:
            self._fail(rs, str(err))
        both = sorted(U & D)
        if both:
            self._fail(
                rs,
                f"sites {both} are listed both as survivors and as dropped: revealing both the self-mask "
                "share and the mask-key share of a site would expose its input",
            )
        if self.site not in U:
            self._fail(rs, "this site uploaded a masked input but is not listed as a survivor")
        t = self.config.threshold
        if len(U) < t:
            self._fail(rs, f"only {len(U)} survivors, fewer than the threshold {t}")
        if U | D != set(rs.held):
            self._fail(
                rs, "the survivor and dropped lists do not match the sites this site exchanged masks with"
            )
        reply = UnmaskReply(
            site=self.site,
            round_id=req.round_id,
            self_mask_shares={u: ShareValue(x=rs.held[u].x, y=rs.held[u].b_share) for u in sorted(U)},
            key_shares={d: ShareValue(x=rs.held[d].x, y=rs.held[d].s_share) for d in sorted(D)},
        )
        rs.unmask_request = req
        rs.unmask_reply = reply
        rs.stage = "answered"
        return reply

    def forget(self, round_id: str) -> None:
        """Drop a round's secrets (its id stays used)."""
        self.state.rounds.pop(round_id, None)

    # ---- helpers
    def _round(self, round_id: str, stages: tuple[str, ...], step: str) -> RoundState:
        rs = self.state.rounds.get(round_id)
        if rs is None:
            raise SecAggAbort(f"site {self.site!r}: {step}: unknown or finished round {round_id!r}")
        if rs.stage == "aborted":
            raise SecAggAbort(f"site {self.site!r}: round {round_id!r} was aborted: {rs.abort_reason}")
        if rs.stage not in stages:
            raise SecAggAbort(
                f"site {self.site!r}: {step} is not allowed at stage {rs.stage!r} of {round_id!r}"
            )
        return rs

    def _fail(self, rs: RoundState, reason: str) -> NoReturn:
        rs.stage = "aborted"
        rs.abort_reason = reason
        rs.c_sk = rs.s_sk = rs.b = ""
        rs.held = {}
        raise SecAggAbort(f"site {self.site!r}, round {rs.round_id!r}: {reason}")

    def _int_block(self, fields: dict[str, int], ints: Mapping[str, object]) -> np.ndarray:
        if set(ints) != set(fields):
            raise ValueError(f"ints must have exactly the fields {list(fields)}, got {list(ints)}")
        parts = []
        for name, length in fields.items():
            v = np.asarray(ints[name]).reshape(-1)
            if v.shape[0] != length or not (np.issubdtype(v.dtype, np.integer) or v.dtype == bool):
                raise ValueError(f"int field {name!r} must be {length} integer(s)")
            v = v.astype(np.int64)
            if v.size and (v.min() < 0 or v.max() > self.config.int_max):
                raise ValueError(f"int field {name!r} must be within [0, {self.config.int_max}]")
            parts.append(v)
        return np.concatenate(parts).astype(np.uint32) if parts else np.zeros(0, np.uint32)


# --------------------------------------------------------------------------- server


@dataclass(frozen=True)
class AggregateResult:
    """What the server learns: sums over the survivors only.

    ``ring_sum`` holds the unmasked float part as ring integers; ``float_sum`` (float64) and
    :meth:`mean_parts` (float32 tensors, scaled) are read from it. :meth:`release` hands its
    buffer back to the server's pool once the caller is done with both."""

    round_id: str
    survivors: list[str]
    dropped: list[str]
    ring_sum: np.ndarray  # uint32, the exact ring sum of the survivors' quantised values
    ints: dict[str, np.ndarray]  # int64 exact sums per int field
    num_clipped: int
    quantization_step: float
    excluded: dict[str, str] = field(default_factory=dict)
    pool: BufferPool | None = field(default=None, repr=False, compare=False)

    @functools.cached_property
    def float_sum(self) -> np.ndarray:
        """float64, exact sum of the survivors' quantised values."""
        return masking.dequantize_step(self.ring_sum, self.quantization_step)

    def mean_parts(self, factor: float,
                   shapes: Sequence[tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
        """``factor`` × the float sum as float32 arrays of ``shapes`` (back to back, in order)."""
        return masking.dequantize_parts(self.ring_sum, self.quantization_step, factor, shapes)

    def release(self) -> None:
        """The caller no longer reads ``ring_sum``: its buffer may serve the next round."""
        if self.pool is not None and self.ring_sum.base is not None:
            self.pool.give(self.ring_sum.base)

    @property
    def num_samples(self) -> int:
        return int(self.ints["num_samples"].sum())

    @property
    def error_bound(self) -> float:
        """Max |float_sum - Σ clipped inputs| from quantisation: |U| · Δ/2."""
        return len(self.survivors) * self.quantization_step / 2


class BlockSource(Protocol):
    """A vector read block by block (an upload spooled to disk: ``SpooledArray``), so the server
    adds it into its sum without a full-size copy of its own."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def blocks(self, size: int) -> Iterator[np.ndarray]: ...


class SecAggServer:
    """The server side of one round. Sites that send malformed or unverifiable messages are
    left out (``excluded``: site -> reason); too few remaining sites or shares → SecAggAbort."""

    def __init__(
        self,
        config: SecAggConfig,
        round_id: str,
        float_length: int,
        int_fields: Mapping[str, int] | None = None,
        pool: BufferPool | None = None,
    ) -> None:
        """``pool``: where the running sum's buffer comes from (and goes back to, through
        :meth:`AggregateResult.release`); None allocates a fresh one."""
        self.config = config
        self.pool = pool
        self.round_id = round_id
        self.float_length = int(float_length)
        self.int_fields = _check_int_fields(
            dict(int_fields if int_fields is not None else {"num_samples": 1})
        )
        self.vector_length = self.float_length + sum(self.int_fields.values()) + 1
        self.excluded: dict[str, str] = {}
        self._adverts: dict[str, KeyAdvertisement] = {}
        self._sharers: list[str] = []
        self._peers: dict[str, list[str]] = {}
        self._sum: np.ndarray | None = None
        self._unmask_req: UnmaskRequest | None = None
        self._stage = "advertise"

    # ---- step 0 → 1
    def advertisements(self, adverts: Iterable[KeyAdvertisement]) -> ShareKeysRequest:
        self._expect("advertise")
        for adv in adverts:
            if adv.site in self._adverts or adv.site in self.excluded:
                self.excluded[adv.site] = "sent two advertisements"
                self._adverts.pop(adv.site, None)
                continue
            try:
                verify_advertisement(self.config, adv, self.round_id)
            except SecAggAbort as err:
                self.excluded[adv.site] = str(err)
                continue
            self._adverts[adv.site] = adv
        self._need(len(self._adverts), "sites with valid key advertisements")
        self._stage = "share"
        return ShareKeysRequest(
            round_id=self.round_id, advertisements=[self._adverts[s] for s in sorted(self._adverts)]
        )

    # ---- step 1 → 2
    def relay_shares(self, replies: Iterable[ShareKeysReply]) -> dict[str, MaskRequest]:
        self._expect("share")
        good: dict[str, ShareKeysReply] = {}
        for rep in replies:
            problem = None
            expected = set(self._adverts) - {rep.site}
            if rep.site not in self._adverts:
                problem = "sent shares without a valid advertisement"
            elif rep.site in good:
                problem = "sent two share replies"
            elif rep.round_id != self.round_id or any(s.round_id != self.round_id for s in rep.shares):
                problem = "sent shares for another round"
            elif any(s.sender != rep.site for s in rep.shares):
                problem = "sent shares in another site's name"
            elif sorted(s.recipient for s in rep.shares) != sorted(expected):
                problem = "did not send exactly one share to every other advertised site"
            if problem:
                self.excluded[rep.site] = problem
                good.pop(rep.site, None)
            else:
                good[rep.site] = rep
        self._need(len(good), "sites that shared keys")
        self._sharers = sorted(good)
        self._stage = "mask"
        return {
            j: MaskRequest(
                site=j,
                round_id=self.round_id,
                float_length=self.float_length,
                int_fields=self.int_fields,
                shares=[s for i in self._sharers if i != j for s in good[i].shares if s.recipient == j],
            )
            for j in self._sharers
        }

    # ---- step 2
    def add_masked(self, meta: MaskedInput, vector: np.ndarray | BlockSource) -> bool:
        """Accumulate one masked upload; False (and ``excluded[site]``) if it is not acceptable.
        ``vector``: an array, or a :class:`BlockSource` read block by block."""
        self._expect("mask")
        site = meta.site
        vec = vector if hasattr(vector, "blocks") else np.asarray(vector)
        problem = None
        if site not in self._sharers:
            problem = "uploaded without having shared keys"
        elif site in self._peers:
            problem = "uploaded twice"
        elif meta.round_id != self.round_id:
            problem = f"uploaded for round {meta.round_id!r}"
        elif meta.config_digest != self.config.digest:
            problem = "uses a different secure-aggregation configuration"
        elif meta.float_length != self.float_length or list(meta.int_fields.items()) != list(
            self.int_fields.items()
        ):
            problem = "used another vector layout"
        elif meta.peers != [s for s in self._sharers if s != site]:
            problem = "masked with another set of peers than the sites that shared keys"
        elif vec.dtype.kind != "u" or vec.dtype.itemsize != 4 or vec.shape != (self.vector_length,):
            problem = f"uploaded a vector that is not uint32[{self.vector_length}]"
        if problem:
            self.excluded[site] = problem
            return False
        first = self._sum is None
        if first:
            self._sum = (self.pool.take(self.vector_length) if self.pool is not None
                         else np.empty(self.vector_length, dtype=np.uint32))
        total = self._sum
        assert total is not None
        try:
            pos = 0
            for blk in (vec.blocks(_ADD_BLOCK) if hasattr(vec, "blocks")  # type: ignore[union-attr]
                        else (vec[a : a + _ADD_BLOCK] for a in range(0, vec.shape[0], _ADD_BLOCK))):
                dst = total[pos : pos + blk.shape[0]]
                if first:
                    dst[...] = blk
                else:
                    np.add(dst, blk, out=dst)
                pos += blk.shape[0]
            if pos != self.vector_length:
                raise OSError(f"read {pos} of {self.vector_length} values")
        except OSError as err:  # a spooled upload that cannot be read back: the sum is lost
            self._abort(f"the masked upload of {site!r} could not be read ({err}); nothing was unmasked")
        self._peers[site] = list(meta.peers)
        return True

    # ---- step 2 → 3
    def unmask_request(self) -> UnmaskRequest:
        if self._stage == "unmask" and self._unmask_req is not None:
            return self._unmask_req
        self._expect("mask")
        survivors = sorted(self._peers)
        if len(survivors) < self.config.threshold:
            self._abort(
                f"only {len(survivors)} masked inputs arrived, "
                f"fewer than the threshold {self.config.threshold}"
            )
        dropped = [s for s in self._sharers if s not in self._peers]
        self._unmask_req = UnmaskRequest(round_id=self.round_id, survivors=survivors, dropped=dropped)
        self._stage = "unmask"
        return self._unmask_req

    # ---- step 3
    def unmask(self, replies: Iterable[UnmaskReply]) -> AggregateResult:
        """Reconstruct, remove the masks, dequantise. All-or-nothing."""
        self._expect("unmask")
        assert self._unmask_req is not None and self._sum is not None
        U, D = self._unmask_req.survivors, self._unmask_req.dropped
        b_shares: dict[str, dict[int, int]] = {u: {} for u in U}
        s_shares: dict[str, dict[int, int]] = {d: {} for d in D}
        answered: set[str] = set()
        for rep in replies:
            try:
                if rep.site not in U or rep.site in answered:
                    raise ValueError("answered the unmask request without being an (unanswered) survivor")
                if rep.round_id != self.round_id:
                    raise ValueError("answered for another round")
                if sorted(rep.self_mask_shares) != U or sorted(rep.key_shares) != D:
                    raise ValueError("answered for other survivor/dropped sets")
                x = self.config.x_of(rep.site)
                vals = list(rep.self_mask_shares.values()) + list(rep.key_shares.values())
                if any(v.x != x for v in vals):
                    raise ValueError("sent shares at another site's evaluation point")
                b = {u: shamir.share_from_hex(v.y) for u, v in rep.self_mask_shares.items()}
                s = {d: shamir.share_from_hex(v.y) for d, v in rep.key_shares.items()}
            except ValueError as err:
                self.excluded[rep.site] = str(err)
                continue
            answered.add(rep.site)
            for u, y in b.items():
                b_shares[u][x] = y
            for d, y in s.items():
                s_shares[d][x] = y
        t = self.config.threshold
        short = [f"{u} (self mask: {len(v)})" for u, v in b_shares.items() if len(v) < t]
        short += [f"{d} (mask key: {len(v)})" for d, v in s_shares.items() if len(v) < t]
        if short:
            self._abort(
                f"{len(answered)} sites answered the unmask request; fewer than the threshold {t} shares for "
                f"{', '.join(short)}; nothing was unmasked"
            )

        masks: list[tuple[bytes, int]] = []
        for u in U:
            commit = b64d(self._adverts[u].b_commit, "b_commit", 32)
            b_u = self._recover(
                u,
                "self mask",
                b_shares[u],
                lambda v, u=u, c=commit: _keys.self_mask_commitment(self.round_id, u, v) == c,
            )
            masks.append((b_u, -1))
        for d in D:
            s_pk = b64d(self._adverts[d].s_pk, "s_pk", 32)
            raw = self._recover(
                d,
                "mask key",
                s_shares[d],
                lambda v, p=s_pk: _keys.x25519_public_bytes(X25519PrivateKey.from_private_bytes(v)) == p,
            )
            s_d = X25519PrivateKey.from_private_bytes(raw)
            for u in U:
                if d in self._peers[u]:
                    seed = pairwise_seed(s_d, _xpub(self._adverts[u].s_pk), self.round_id, d, u)
                    masks.append((seed, -(1 if u < d else -1)))  # undo what u added
        total = self._sum
        self._sum = None
        masking.apply_masks(total, masks)
        self._stage = "done"

        L = self.float_length
        ints: dict[str, np.ndarray] = {}
        pos = L
        for name, length in self.int_fields.items():
            ints[name] = total[pos : pos + length].astype(np.int64)
            pos += length
        return AggregateResult(
            round_id=self.round_id,
            survivors=list(U),
            dropped=list(D),
            ring_sum=total[:L],
            ints=ints,
            num_clipped=int(total[-1]),
            quantization_step=self.config.quantization_step,
            excluded=dict(self.excluded),
            pool=self.pool,
        )

    # ---- helpers
    def _recover(
        self, owner: str, what: str, shares: dict[int, int], check: Callable[[bytes], bool]
    ) -> bytes:
        xs = sorted(shares)
        for i, combo in enumerate(itertools.combinations(xs, self.config.threshold)):
            if i >= _MAX_RECOMBINATIONS:
                break
            try:
                secret = shamir.combine({x: shares[x] for x in combo}, SEED_BYTES)
            except ValueError:
                continue
            if check(secret):
                return secret
        self._abort(
            f"the {what} shares of site {owner!r} are inconsistent (corrupted shares); nothing was unmasked"
        )

    def _need(self, count: int, what: str) -> None:
        if count < self.config.threshold:
            self._abort(f"only {count} {what}, fewer than the threshold {self.config.threshold}")

    def _expect(self, stage: str) -> None:
        if self._stage != stage:
            raise SecAggAbort(
                f"secure aggregation round {self.round_id!r}: expected step {stage!r}, at {self._stage!r}"
            )

    def _abort(self, reason: str) -> NoReturn:
        self._stage = "aborted"
        self._sum = None
        raise SecAggAbort(f"secure aggregation round {self.round_id!r} aborted: {reason}")
