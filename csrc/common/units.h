#pragma once
/// Memory sizes as users write them: a byte count or a string such as "4GiB", "512 MB", "1.5G".
#include <cstdint>
#include <string>
#include <string_view>

namespace gpufleet {

/// Parses a memory size. Units: B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB and the bare
/// K/M/G/T (powers of 1024, as docker and nvidia-smi use them); case-insensitive; a plain number is
/// bytes. Throws std::invalid_argument naming the text and the accepted forms.
std::uint64_t parse_memory_size(std::string_view text);

/// "79.6 GiB", "512 MiB", "17 B": binary units, one decimal place above KiB.
std::string format_memory_size(std::uint64_t bytes);

}  // namespace gpufleet
