// Node identity for TLS: a self-signed X.509 certificate made from the node's Ed25519 key, presented by
// both sides of every connection (mutual TLS 1.3 without a CA). A peer is authenticated by checking that
// its certificate's public key hashes (SHA-256 of the raw 32-byte key) to the peer id we expected.
#pragma once

#include <gnutls/gnutls.h>
#include <ngtcp2/ngtcp2_crypto.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "quic/types.h"

namespace im::quic {

class TlsError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Per-connection TLS state that the certificate check reads and writes. The GnuTLS session's user
// pointer must be the ngtcp2 conn_ref (ngtcp2's crypto layer reads it), so the conn_ref is the first
// member of this standard-layout struct and the verify callback recovers the struct from it.
struct TlsPeer {
  ngtcp2_crypto_conn_ref conn_ref{};
  bool expect_peer = false;  // client side: the peer id the caller asked for
  PeerId expected{};
  bool verified = false;     // set once the certificate passed
  PeerId peer{};             // the authenticated peer id
  std::string failure;       // why the certificate was refused
  bool mismatch = false;     // refused because the key hashed to another peer id
};

class TlsIdentity {
 public:
  // `seed` is the 32-byte raw Ed25519 private key.
  TlsIdentity(const uint8_t* seed, size_t seed_len, std::string alpn);
  ~TlsIdentity();
  TlsIdentity(const TlsIdentity&) = delete;
  TlsIdentity& operator=(const TlsIdentity&) = delete;

  const PeerId& peer_id() const noexcept { return peer_id_; }

  // A GnuTLS session configured for QUIC with our certificate, our ALPN (mandatory) and the peer
  // certificate check; its user pointer is `peer`, which must outlive it.
  gnutls_session_t new_session(bool server, TlsPeer* peer) const;

 private:
  gnutls_certificate_credentials_t cred_ = nullptr;
  gnutls_priority_t priority_ = nullptr;
  std::string alpn_;
  PeerId peer_id_{};
};

}  // namespace im::quic
