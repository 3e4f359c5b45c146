//! States shown in status.json and on the console: enums in the code, the
//! same lowercase words on the wire as before.

/// Declares an enum of states that serializes to (and parses from) the
/// given words, shows as them, and compares equal to them, so that readers
/// of status.json and tests written against the words keep working.
#[macro_export]
macro_rules! named_states {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $word:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, ::serde::Serialize, ::serde::Deserialize)]
        $vis enum $name {
            $($(#[$vmeta])* #[serde(rename = $word)] $variant),+
        }

        impl $name {
            /// Every state, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $word),+
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}

#[cfg(test)]
mod tests {
    named_states! {
        /// A sample.
        enum Light { Red = "red", Green = "green" }
    }

    #[test]
    fn states_serialize_show_and_compare_as_their_words() {
        assert_eq!(serde_json::to_string(&Light::Red).unwrap(), "\"red\"");
        let back: Light = serde_json::from_str("\"green\"").unwrap();
        assert_eq!(back, Light::Green);
        assert_eq!(Light::Green.to_string(), "green");
        assert!(Light::Red == "red" && Light::Red != "green");
        assert_eq!(Light::ALL, &[Light::Red, Light::Green]);
    }
}
