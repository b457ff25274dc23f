// qsengine core: version of the C++ core and of its serialised formats.
#pragma once

namespace qs {

// Bumped whenever a serialised result (RoutingStats, Packing, ...) changes shape.
constexpr int kFormatVersion = 1;

}  // namespace qs

namespace qs {
int format_version() noexcept;
}  // namespace qs
