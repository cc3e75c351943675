// Compiled once per instruction set, like quantize_kernels_isa.cpp.
#include "../core/pack_span.h"
#include "pack_kernels.h"

namespace linquant::cpu {
namespace {

namespace core = linquant::core::LINQUANT_CPU_ISA;

const PackKernels kTable = {
    {nullptr, core::pack_row<1>, core::pack_row<2>, core::pack_row<3>, core::pack_row<4>, core::pack_row<5>,
     core::pack_row<6>, core::pack_row<7>, core::pack_row<8>},
    {nullptr, core::unpack_row<1>, core::unpack_row<2>, core::unpack_row<3>, core::unpack_row<4>,
     core::unpack_row<5>, core::unpack_row<6>, core::unpack_row<7>, core::unpack_row<8>},
};

}  // namespace

const PackKernels& LINQUANT_ISA_NAME(pack_kernels)() { return kTable; }

}  // namespace linquant::cpu
