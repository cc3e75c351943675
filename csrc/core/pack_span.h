// Torch-free bit packing of one row: values of BITS bits (1..8) laid end to end in a little-endian
// bit stream, element i at bits [i*BITS, (i+1)*BITS), so the lowest-index element sits in the
// lowest bits of its byte ([0,1,2,3] at 2 bits -> 0b11100100 = 228). Eight values always fill
// exactly BITS bytes, which is the unit the loops work in; a row's last, partial unit is padded
// with zero bits. Host and device.
#pragma once

#include <cstdint>
#include <cstring>

#include "float_convert.h"  // LQ_HD and the per-ISA inline namespace

namespace linquant::core {
inline namespace LINQUANT_CPU_ISA {

// Bytes that n values of `bits` bits take: whole 8-value units, then the tail, so that no size
// overflows (n * bits would past 2^63 / bits, as a bad `size` argument of unpack can ask).
LQ_HD int64_t packed_size(int64_t n, int bits) { return n / 8 * bits + (n % 8 * bits + 7) / 8; }

// Eight values, one per byte of the little-endian word `w`, -> BITS bytes in the low bits of the
// result. Widths 1, 2 and 4 use shift-and-mask compression (log2 steps instead of 8); the others
// shift each value into place.
template <int BITS>
LQ_HD uint64_t pack8(uint64_t w) {
  if constexpr (BITS == 8) {
    return w;
  } else if constexpr (BITS == 4) {
    w = (w | (w >> 4)) & 0x00FF00FF00FF00FFull;
    w = (w | (w >> 8)) & 0x0000FFFF0000FFFFull;
    return (w | (w >> 16)) & 0x00000000FFFFFFFFull;
  } else if constexpr (BITS == 2) {
    w = (w | (w >> 6)) & 0x000F000F000F000Full;
    w = (w | (w >> 12)) & 0x000000FF000000FFull;
    return (w | (w >> 24)) & 0x000000000000FFFFull;
  } else if constexpr (BITS == 1) {
    w = (w | (w >> 7)) & 0x0003000300030003ull;
    w = (w | (w >> 14)) & 0x0000000F0000000Full;
    return (w | (w >> 28)) & 0x00000000000000FFull;
  } else {
    uint64_t acc = 0;
    for (int k = 0; k < 8; ++k) acc |= ((w >> (8 * k)) & 0xFFu) << (k * BITS);
    return acc;
  }
}

// Inverse of pack8: the low 8*BITS bits of `acc` -> eight values, one per byte of the result.
template <int BITS>
LQ_HD uint64_t unpack8(uint64_t acc) {
  if constexpr (BITS == 8) {
    return acc;
  } else if constexpr (BITS == 4) {
    acc &= 0x00000000FFFFFFFFull;
    acc = (acc | (acc << 16)) & 0x0000FFFF0000FFFFull;
    acc = (acc | (acc << 8)) & 0x00FF00FF00FF00FFull;
    return (acc | (acc << 4)) & 0x0F0F0F0F0F0F0F0Full;
  } else if constexpr (BITS == 2) {
    acc &= 0x000000000000FFFFull;
    acc = (acc | (acc << 24)) & 0x000000FF000000FFull;
    acc = (acc | (acc << 12)) & 0x000F000F000F000Full;
    return (acc | (acc << 6)) & 0x0303030303030303ull;
  } else if constexpr (BITS == 1) {
    acc &= 0x00000000000000FFull;
    acc = (acc | (acc << 28)) & 0x0000000F0000000Full;
    acc = (acc | (acc << 14)) & 0x0003000300030003ull;
    return (acc | (acc << 7)) & 0x0101010101010101ull;
  } else {
    constexpr uint64_t mask = (uint64_t{1} << BITS) - 1;
    uint64_t w = 0;
    for (int k = 0; k < 8; ++k) w |= ((acc >> (k * BITS)) & mask) << (8 * k);
    return w;
  }
}

// Packs q[0:n] (each < 2^BITS) into out[0:packed_size(n, BITS)]; returns the OR of all values so
// the caller can tell whether any was out of range (result >> BITS != 0). Little-endian hosts.
template <int BITS>
uint8_t pack_row(const uint8_t* q, int64_t n, uint8_t* out) {
  const int64_t units = n / 8;
  uint64_t seen = 0;
#pragma omp simd reduction(| : seen)
  for (int64_t u = 0; u < units; ++u) {
    uint64_t w;
    std::memcpy(&w, q + u * 8, 8);
    seen |= w;
    const uint64_t acc = pack8<BITS>(w);
    std::memcpy(out + u * BITS, &acc, BITS);
  }
  const int64_t tail = n - units * 8;
  if (tail > 0) {
    uint64_t w = 0;
    std::memcpy(&w, q + units * 8, static_cast<size_t>(tail));
    seen |= w;
    const uint64_t acc = pack8<BITS>(w);
    std::memcpy(out + units * BITS, &acc, static_cast<size_t>(packed_size(tail, BITS)));
  }
  for (int shift = 32; shift >= 8; shift /= 2) seen |= seen >> shift;
  return static_cast<uint8_t>(seen);
}

template <int BITS>
void unpack_row(const uint8_t* packed, int64_t n, uint8_t* q) {
  const int64_t units = n / 8;
#pragma omp simd
  for (int64_t u = 0; u < units; ++u) {
    uint64_t acc = 0;
    std::memcpy(&acc, packed + u * BITS, BITS);
    const uint64_t w = unpack8<BITS>(acc);
    std::memcpy(q + u * 8, &w, 8);
  }
  const int64_t tail = n - units * 8;
  if (tail > 0) {
    uint64_t acc = 0;
    std::memcpy(&acc, packed + units * BITS, static_cast<size_t>(packed_size(tail, BITS)));
    const uint64_t w = unpack8<BITS>(acc);
    std::memcpy(q + units * 8, &w, static_cast<size_t>(tail));
  }
}

}  // namespace LINQUANT_CPU_ISA
}  // namespace linquant::core
