#include "quic/identity.h"

#include <gnutls/crypto.h>
#include <gnutls/x509.h>
#include <ngtcp2/ngtcp2_crypto_gnutls.h>

#include <cstring>
#include <ctime>
#include <memory>

namespace im::quic {
namespace {

// TLS 1.3 only; Ed25519 signatures must stay enabled since every certificate uses them.
constexpr const char* kPriority =
    "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-128-GCM:+AES-256-GCM:+CHACHA20-POLY1305:"
    "-GROUP-ALL:+GROUP-X25519:+GROUP-SECP256R1:+SIGN-EDDSA-ED25519:%DISABLE_TLS13_COMPAT_MODE";

// DER PKCS#8 prefix of an Ed25519 private key (RFC 8410); the 32-byte seed follows. Importing the key
// this way makes GnuTLS derive the public key, which its raw-import call does not do.
constexpr uint8_t kEd25519Pkcs8Prefix[16] = {0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06,
                                             0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20};

void check(int rv, const char* what) {
  if (rv < 0) throw TlsError(std::string(what) + ": " + gnutls_strerror(rv));
}

struct Crt {
  gnutls_x509_crt_t crt = nullptr;
  Crt() { check(gnutls_x509_crt_init(&crt), "gnutls_x509_crt_init"); }
  ~Crt() { gnutls_x509_crt_deinit(crt); }
};

struct Key {
  gnutls_x509_privkey_t key = nullptr;
  Key() { check(gnutls_x509_privkey_init(&key), "gnutls_x509_privkey_init"); }
  ~Key() { gnutls_x509_privkey_deinit(key); }
};

PeerId hash_public_key(const uint8_t* key, size_t len) {
  PeerId id{};
  check(gnutls_hash_fast(GNUTLS_DIG_SHA256, key, len, id.data()), "sha256");
  return id;
}

// Extracts the raw Ed25519 key of a certificate and checks its self-signature. Returns an empty string
// on success, else why the certificate is unacceptable.
std::string certificate_peer_id(const gnutls_datum_t& der, PeerId* out) {
  Crt c;
  if (gnutls_x509_crt_import(c.crt, &der, GNUTLS_X509_FMT_DER) < 0) return "unparseable certificate";
  if (gnutls_x509_crt_get_pk_algorithm(c.crt, nullptr) != GNUTLS_PK_EDDSA_ED25519) {
    return "certificate key is not Ed25519";
  }
  unsigned status = 0;
  if (gnutls_x509_crt_verify(c.crt, &c.crt, 1, GNUTLS_VERIFY_DISABLE_TIME_CHECKS, &status) < 0 || status != 0) {
    return "certificate is not validly self-signed";
  }
  gnutls_ecc_curve_t curve;
  gnutls_datum_t x{};
  if (gnutls_x509_crt_get_pk_ecc_raw(c.crt, &curve, &x, nullptr) < 0) return "cannot read certificate key";
  std::unique_ptr<unsigned char, void (*)(void*)> hold(x.data, gnutls_free);
  if (curve != GNUTLS_ECC_CURVE_ED25519 || x.size != 32) return "certificate key is not a 32-byte Ed25519 key";
  *out = hash_public_key(x.data, x.size);
  return {};
}

// GnuTLS calls this during the handshake on both sides. Returning nonzero aborts the handshake.
int verify_peer(gnutls_session_t session) {
  auto* peer = reinterpret_cast<TlsPeer*>(gnutls_session_get_ptr(session));
  unsigned count = 0;
  const gnutls_datum_t* certs = gnutls_certificate_get_peers(session, &count);
  if (certs == nullptr || count != 1) {
    peer->failure = "peer must present exactly one self-signed certificate";
    return -1;
  }
  PeerId id{};
  std::string why = certificate_peer_id(certs[0], &id);
  if (!why.empty()) {
    peer->failure = why;
    return -1;
  }
  if (peer->expect_peer && id != peer->expected) {
    peer->mismatch = true;
    peer->failure = "peer presented key of peer " + peer_id_hex(id, 6) + ", expected " +
                    peer_id_hex(peer->expected, 6);
    return -1;
  }
  peer->peer = id;
  peer->verified = true;
  return 0;
}

}  // namespace

std::string peer_id_hex(const PeerId& id, size_t bytes) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < bytes && i < id.size(); ++i) {
    s += digits[id[i] >> 4];
    s += digits[id[i] & 15];
  }
  return s;
}

TlsIdentity::TlsIdentity(const uint8_t* seed, size_t seed_len, std::string alpn) : alpn_(std::move(alpn)) {
  if (seed_len != 32) throw TlsError("the private key must be the 32-byte Ed25519 seed");
  if (alpn_.empty() || alpn_.size() > 255) throw TlsError("ALPN must be 1..255 bytes");
  uint8_t der[48];
  std::memcpy(der, kEd25519Pkcs8Prefix, sizeof kEd25519Pkcs8Prefix);
  std::memcpy(der + 16, seed, 32);
  Key key;
  gnutls_datum_t der_datum{der, sizeof der};
  int rv = gnutls_x509_privkey_import(key.key, &der_datum, GNUTLS_X509_FMT_DER);
  gnutls_memset(der, 0, sizeof der);
  check(rv, "importing the Ed25519 key");

  gnutls_ecc_curve_t curve;
  gnutls_datum_t x{}, k{};
  check(gnutls_x509_privkey_export_ecc_raw(key.key, &curve, &x, nullptr, &k), "reading the public key");
  peer_id_ = hash_public_key(x.data, x.size);
  gnutls_free(x.data);
  gnutls_memset(k.data, 0, k.size);
  gnutls_free(k.data);

  Crt c;
  check(gnutls_x509_crt_set_version(c.crt, 3), "set_version");
  uint8_t serial[8];
  check(gnutls_rnd(GNUTLS_RND_NONCE, serial, sizeof serial), "gnutls_rnd");
  serial[0] &= 0x7f;  // a positive INTEGER
  check(gnutls_x509_crt_set_serial(c.crt, serial, sizeof serial), "set_serial");
  const time_t now = time(nullptr);
  check(gnutls_x509_crt_set_activation_time(c.crt, now - 3600), "set_activation_time");
  check(gnutls_x509_crt_set_expiration_time(c.crt, now + 10L * 365 * 24 * 3600), "set_expiration_time");
  const std::string cn = "inferencemesh " + peer_id_hex(peer_id_);
  check(gnutls_x509_crt_set_dn_by_oid(c.crt, GNUTLS_OID_X520_COMMON_NAME, 0, cn.data(),
                                      static_cast<unsigned>(cn.size())),
        "set_dn");
  check(gnutls_x509_crt_set_key(c.crt, key.key), "set_key");
  check(gnutls_x509_crt_set_key_usage(c.crt, GNUTLS_KEY_DIGITAL_SIGNATURE), "set_key_usage");
  check(gnutls_x509_crt_sign2(c.crt, c.crt, key.key, GNUTLS_DIG_SHA512, 0), "self-signing the certificate");

  check(gnutls_certificate_allocate_credentials(&cred_), "allocate_credentials");
  check(gnutls_certificate_set_x509_key(cred_, &c.crt, 1, key.key), "set_x509_key");
  check(gnutls_priority_init(&priority_, kPriority, nullptr), "priority_init");
}

TlsIdentity::~TlsIdentity() {
  if (priority_ != nullptr) gnutls_priority_deinit(priority_);
  if (cred_ != nullptr) gnutls_certificate_free_credentials(cred_);
}

gnutls_session_t TlsIdentity::new_session(bool server, TlsPeer* peer) const {
  gnutls_session_t session = nullptr;
  const unsigned flags = (server ? GNUTLS_SERVER : GNUTLS_CLIENT) | GNUTLS_NO_TICKETS | GNUTLS_NO_END_OF_EARLY_DATA;
  check(gnutls_init(&session, flags), "gnutls_init");
  std::unique_ptr<gnutls_session_int, void (*)(gnutls_session_t)> guard(session, gnutls_deinit);
  if ((server ? ngtcp2_crypto_gnutls_configure_server_session(session)
              : ngtcp2_crypto_gnutls_configure_client_session(session)) != 0) {
    throw TlsError("ngtcp2_crypto_gnutls_configure_session failed");
  }
  check(gnutls_priority_set(session, priority_), "priority_set");
  check(gnutls_credentials_set(session, GNUTLS_CRD_CERTIFICATE, cred_), "credentials_set");
  if (server) gnutls_certificate_server_set_request(session, GNUTLS_CERT_REQUIRE);
  gnutls_session_set_verify_function(session, verify_peer);
  gnutls_datum_t alpn{reinterpret_cast<unsigned char*>(const_cast<char*>(alpn_.data())),
                      static_cast<unsigned>(alpn_.size())};
  check(gnutls_alpn_set_protocols(session, &alpn, 1, GNUTLS_ALPN_MANDATORY), "alpn_set_protocols");
  gnutls_session_set_ptr(session, peer);
  return guard.release();
}

}  // namespace im::quic
