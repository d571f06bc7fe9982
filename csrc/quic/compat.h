// The few ngtcp2 calls whose names or signatures changed between the pre-1.0 API (Debian 12 ships
// 0.12.1) and 1.x (Debian 13). Everything else in csrc/quic uses calls that are identical in both.
//
//   0.12                                           1.x
//   ngtcp2_connection_close_error (+ _default,      ngtcp2_ccerr (+ ngtcp2_ccerr_default,
//     _set_transport_error_liberr,                    ngtcp2_ccerr_set_liberr,
//     _set_application_error)                         ngtcp2_ccerr_set_application_error)
//   ngtcp2_conn_get_connection_close_error(c, &e)  const ngtcp2_ccerr* ngtcp2_conn_get_ccerr(c)
//   ngtcp2_conn_shutdown_stream(c, id, code)       ngtcp2_conn_shutdown_stream(c, flags, id, code)
//   ngtcp2_conn_get_conn_stat(c, &stat)            ngtcp2_conn_get_conn_info(c, &info)
//   transport_params.original_dcid                 ... plus original_dcid_present = 1
//   pacer lets a write through when its next slot  pacer holds every write until its slot
//     is under 1 ms away (see drop_imminent_pacing_slot)
//   ngtcp2_conn_get_num_scid(c)                    ngtcp2_conn_get_scid(c, NULL)
//   ngtcp2_conn_is_in_closing_period(c)            ngtcp2_conn_in_closing_period(c)
//   ngtcp2_conn_is_in_draining_period(c)           ngtcp2_conn_in_draining_period(c)
#pragma once

#include <ngtcp2/ngtcp2.h>
#include <ngtcp2/ngtcp2_crypto.h>
#include <ngtcp2/version.h>

#include <cstdint>

#if NGTCP2_VERSION_NUM >= 0x010000
#define IM_NGTCP2_V1 1
#else
#define IM_NGTCP2_V1 0
#endif

namespace im::quic::compat {
// Before 0.14.0 ngtcp2 never closed a stream the peer opened unidirectionally (it lacked the
// FIN_ACKED flag of the never-used send side), so the peer's stream credit never came back and a
// connection stopped after max_streams one-way messages. There one-way messages go on
// bidirectional streams, which the receiver resets (no response) once it has handed the frame up.
inline constexpr bool kRemoteUniStreamsClose = NGTCP2_VERSION_NUM >= 0x000e00;
}  // namespace im::quic::compat

namespace im::quic::compat {

// What the connection statistics read from either version's info/stat struct.
struct RttInfo {
  uint64_t smoothed_rtt, min_rtt, cwnd, bytes_in_flight;
};

#if IM_NGTCP2_V1
using CloseError = ngtcp2_ccerr;
inline void close_error_default(CloseError* e) { ngtcp2_ccerr_default(e); }
inline void close_error_set_liberr(CloseError* e, int liberr) { ngtcp2_ccerr_set_liberr(e, liberr, nullptr, 0); }
inline void close_error_set_application(CloseError* e, uint64_t code) {
  ngtcp2_ccerr_set_application_error(e, code, nullptr, 0);
}
inline void close_error_set_tls_alert(CloseError* e, uint8_t alert) { ngtcp2_ccerr_set_tls_alert(e, alert, nullptr, 0); }
inline CloseError received_close_error(ngtcp2_conn* conn) { return *ngtcp2_conn_get_ccerr(conn); }
inline bool is_application_error(const CloseError& e) { return e.type == NGTCP2_CCERR_TYPE_APPLICATION; }
inline int shutdown_stream(ngtcp2_conn* conn, int64_t stream_id, uint64_t code) {
  return ngtcp2_conn_shutdown_stream(conn, 0, stream_id, code);
}
inline void set_original_dcid(ngtcp2_transport_params* params, const ngtcp2_cid& dcid) {
  params->original_dcid = dcid;
  params->original_dcid_present = 1;
}
inline size_t num_scid(ngtcp2_conn* conn) { return ngtcp2_conn_get_scid(conn, nullptr); }
// 1.x holds writes strictly until the pacer's next slot, so the slot is real and stays.
inline int drop_imminent_pacing_slot(ngtcp2_conn*, uint64_t) { return 0; }
inline bool closing_or_draining(ngtcp2_conn* conn) {
  return ngtcp2_conn_in_closing_period(conn) || ngtcp2_conn_in_draining_period(conn);
}
inline RttInfo rtt_info(ngtcp2_conn* conn) {
  ngtcp2_conn_info info;
  ngtcp2_conn_get_conn_info(conn, &info);
  return {info.smoothed_rtt, info.min_rtt, info.cwnd, info.bytes_in_flight};
}
#else
using CloseError = ngtcp2_connection_close_error;
inline void close_error_default(CloseError* e) { ngtcp2_connection_close_error_default(e); }
inline void close_error_set_liberr(CloseError* e, int liberr) {
  ngtcp2_connection_close_error_set_transport_error_liberr(e, liberr, nullptr, 0);
}
inline void close_error_set_application(CloseError* e, uint64_t code) {
  ngtcp2_connection_close_error_set_application_error(e, code, nullptr, 0);
}
inline void close_error_set_tls_alert(CloseError* e, uint8_t alert) {
  ngtcp2_connection_close_error_set_transport_error_tls_alert(e, alert, nullptr, 0);
}
inline CloseError received_close_error(ngtcp2_conn* conn) {
  CloseError e;
  ngtcp2_conn_get_connection_close_error(conn, &e);
  return e;
}
inline bool is_application_error(const CloseError& e) {
  return e.type == NGTCP2_CONNECTION_CLOSE_ERROR_CODE_TYPE_APPLICATION;
}
inline int shutdown_stream(ngtcp2_conn* conn, int64_t stream_id, uint64_t code) {
  return ngtcp2_conn_shutdown_stream(conn, stream_id, code);
}
inline void set_original_dcid(ngtcp2_transport_params* params, const ngtcp2_cid& dcid) {
  params->original_dcid = dcid;
}
inline size_t num_scid(ngtcp2_conn* conn) { return ngtcp2_conn_get_num_scid(conn); }
// 0.12 lets a write through when the pacer's next slot is under 1 ms away, so such a slot only arms a
// timer that wakes the I/O thread for nothing; handle_expiry cancels it (and runs any timer that is
// due at `now`, which is what a timer wake-up would do anyway).
inline int drop_imminent_pacing_slot(ngtcp2_conn* conn, uint64_t now) { return ngtcp2_conn_handle_expiry(conn, now); }
inline bool closing_or_draining(ngtcp2_conn* conn) {
  return ngtcp2_conn_is_in_closing_period(conn) || ngtcp2_conn_is_in_draining_period(conn);
}
inline RttInfo rtt_info(ngtcp2_conn* conn) {
  ngtcp2_conn_stat stat;
  ngtcp2_conn_get_conn_stat(conn, &stat);
  return {stat.smoothed_rtt, stat.min_rtt, stat.cwnd, stat.bytes_in_flight};
}
#endif

}  // namespace im::quic::compat
