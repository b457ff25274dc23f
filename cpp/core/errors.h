// qsengine core: exception types. The binding layer maps them to Python:
//   InvalidArgument       -> ValueError
//   ResourceLimitExceeded -> qsengine.ResourceLimitError (a ValueError subclass)
//   Cancelled (parallel.h) -> the pending KeyboardInterrupt
// Messages name the argument, the value and the rule that was broken.
#pragma once

#include <stdexcept>
#include <string>

namespace qs {

class InvalidArgument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// A request whose estimated memory (or size) exceeds a configured limit.
class ResourceLimitExceeded : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

}  // namespace qs
