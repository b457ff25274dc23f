#include "core/version.h"

namespace qs {

int format_version() noexcept { return kFormatVersion; }

}  // namespace qs
