//! The character classes of the two pre-tokenizer patterns we read (Unicode general categories
//! from `unicode-properties`; `\s` is White_Space, which `char::is_whitespace` implements).

use unicode_properties::{GeneralCategory, GeneralCategoryGroup, UnicodeGeneralCategory};

/// `\p{L}`
pub fn is_letter(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_alphabetic();
    }
    c.general_category_group() == GeneralCategoryGroup::Letter
}

/// `\p{N}` (Nd, Nl, No: exactly `char::is_numeric`)
pub fn is_number(c: char) -> bool {
    c.is_numeric()
}

/// `\s`
pub fn is_space(c: char) -> bool {
    c.is_whitespace()
}

/// `\w` as Unicode regex engines define it: Alphabetic, Mark, Decimal_Number,
/// Connector_Punctuation and Join_Control.
pub fn is_word(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_alphanumeric() || c == '_';
    }
    c.is_alphabetic()
        || matches!(c, '\u{200C}' | '\u{200D}')
        || matches!(c.general_category_group(), GeneralCategoryGroup::Mark)
        || matches!(c.general_category(), GeneralCategory::DecimalNumber | GeneralCategory::ConnectorPunctuation)
}
